"""Active health probes and the per-worker breaker with real worker processes killed, stopped and restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import httpx

from hpcserve import aio
from hpcserve.mock.launch import MockProcess
from router_util import RouterProc, start_pd, stats, wait_until

HEALTH = ["--health-interval", "0.2", "--health-timeout", "0.5", "--eject-after", "2", "--readmit-after", "2"]


def _circuit(router: RouterProc, url: str) -> str:
    return next(w["circuit"] for w in router.workers()["workers"] if w["url"] == url)


def _generate_n(router: RouterProc, n: int) -> list[int]:
    return [httpx.post(router.url + "/generate", json={"text": f"p{i}"}, timeout=20).status_code for i in range(n)]


def test_killed_worker_is_ejected_and_readmitted_after_restart(tmp_path):
    a = MockProcess.start(["--disaggregation-mode", "null"], log_dir=tmp_path, wait="ready")
    b = MockProcess.start(["--disaggregation-mode", "null"], log_dir=tmp_path, wait="ready")
    router = None
    try:
        router = RouterProc(["--worker", a.url, "--worker", b.url, "--policy", "round_robin", *HEALTH], tmp_path)
        os.kill(a.pid, signal.SIGKILL)
        a.proc.wait(10)
        wait_until(lambda: _circuit(router, a.url) == "open", 10, what="ejection of the killed worker")
        assert httpx.get(router.url + "/ready", timeout=5).status_code == 200  # b still serves
        before = stats(b)["requests"].get("/generate", 0)
        assert _generate_n(router, 6) == [200] * 6
        assert stats(b)["requests"].get("/generate", 0) - before == 6
        metrics = httpx.get(router.url + "/metrics", timeout=5).text
        assert "hpcserve_router_ejections_total 1.0" in metrics

        a = MockProcess.start(["--disaggregation-mode", "null", "--port", str(a.port)], log_dir=tmp_path,
                              wait="ready")
        wait_until(lambda: _circuit(router, a.url) == "closed", 10, what="readmission after restart")
        assert _generate_n(router, 4) == [200] * 4
        assert stats(a)["requests"].get("/generate", 0) == 2  # round robin uses it again
    finally:
        if router is not None:
            router.stop()
        a.stop()
        b.stop()


def test_stopped_worker_is_ejected_then_readmitted_when_continued(tmp_path):
    a = MockProcess.start(["--disaggregation-mode", "null"], log_dir=tmp_path, wait="ready")
    b = MockProcess.start(["--disaggregation-mode", "null"], log_dir=tmp_path, wait="ready")
    router = None
    try:
        router = RouterProc(["--worker", a.url, "--worker", b.url, "--policy", "round_robin", *HEALTH], tmp_path)
        os.kill(b.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: _circuit(router, b.url) == "open", 10, what="ejection of the stopped worker")
            assert _generate_n(router, 4) == [200] * 4  # all on a, none stuck on b
        finally:
            os.kill(b.pid, signal.SIGCONT)
        wait_until(lambda: _circuit(router, b.url) == "closed", 10, what="readmission")
        view = next(w for w in router.workers()["workers"] if w["url"] == b.url)
        assert view["ejections"] == 1 and view["healthy"] is True
    finally:
        if router is not None:
            router.stop()
        a.stop()
        b.stop()


def test_ready_reports_missing_role_and_requests_get_503(tmp_path):
    prefill, decode = start_pd(tmp_path, 1, 1)
    router = None
    try:
        from router_util import pd_args
        router = RouterProc(pd_args([prefill, decode]) + HEALTH, tmp_path)
        os.kill(decode.pid, signal.SIGKILL)
        decode.proc.wait(10)
        wait_until(lambda: httpx.get(router.url + "/ready", timeout=5).status_code == 503, 10, what="not ready")
        ready = httpx.get(router.url + "/ready", timeout=5).json()
        assert ready["missing"] == ["decode"] and ready["healthy"] == {"prefill": 1, "decode": 0}
        r = httpx.post(router.url + "/generate", json={"text": "x"}, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "no healthy decode worker is available"
        assert stats(prefill)["requests"].get("/generate", 0) == 0  # nothing sent to a half pair
        assert [w["inflight"] for w in router.workers()["workers"]] == [0, 0]
    finally:
        if router is not None:
            router.stop()
        prefill.stop()
        decode.stop()


FLAKY_WORKER = r"""
import asyncio, sys
from hpcserve.http import HttpServer
n = 0
def handle(req, conn):
    global n
    if req.path == b"/health":
        conn.respond(200, b"{}")
        return
    n += 1
    conn.respond(500 if n % 2 else 200, b'{"text": "ok"}')
async def main():
    await HttpServer(handle).start("127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
asyncio.run(main())
"""


def test_passive_successes_reset_the_failure_count(tmp_path):
    import subprocess
    import sys
    from router_util import free_port
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-c", FLAKY_WORKER, str(port)])
    router = None
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 10)
        router = RouterProc(["--worker", f"http://127.0.0.1:{port}", "--eject-after", "2", "--health-interval", "60"],
                            tmp_path)
        codes = [httpx.post(router.url + "/generate", json={"text": "x"}, timeout=10).status_code for _ in range(8)]
        assert codes == [500, 200] * 4  # worker errors are passed through, not retried
        view = router.workers()["workers"][0]
        assert view["circuit"] == "closed" and view["ejections"] == 0  # never 2 failures in a row
    finally:
        if router is not None:
            router.stop()
        worker.terminate()
        worker.wait(10)


# ---- the probe rules in-process, against small servers on 127.0.0.1 (uvloop, as the router runs)

def _checker(handler_answers: bool, **kw):
    """A WorkerSet with one worker served by an in-process HttpServer that answers /health (or never)."""
    from hpcserve.router.health import HealthChecker
    from hpcserve.router.workers import WorkerSet

    async def make():
        from hpcserve.http import HttpServer

        def handle(req, conn):
            if handler_answers:
                conn.respond(200, b"{}")
                return None
            return asyncio.sleep(3600)  # accepted, never answered: a stalled server
        server = HttpServer(handle)
        port = await server.start("127.0.0.1", 0)
        ws = WorkerSet("aggregated", eject_after=3)
        w = ws.add_static("both", f"http://127.0.0.1:{port}")
        return server, ws, w, HealthChecker(ws, **kw)
    return make


def test_a_probe_timeout_ejects_at_once_as_stalled():
    stalled = []

    async def run():
        server, ws, w, hc = await _checker(False, interval=0.2, timeout=5.0)()
        hc.on_stalled = stalled.append
        assert hc.timeout == 0.2  # capped at the interval
        ws.probe_round = 7
        assert await hc.probe(w) is False
        await server.stop()
        return w
    w = aio.run(run())
    assert w.circuit == "open" and w.fails == 1 and stalled == [w]  # one timeout, not eject-after (3)
    assert w.last_ejection["stalled"] is True
    assert (w.last_ejection["first_failed_round"], w.last_ejection["round"]) == (7, 7)


def test_quick_failures_are_reprobed_within_the_round():
    from hpcserve.router.health import HealthChecker
    from hpcserve.router.workers import WorkerSet
    from router_util import free_port

    async def run():
        ws = WorkerSet("aggregated", eject_after=3)
        w = ws.add_static("both", f"http://127.0.0.1:{free_port()}")  # nothing listens: refused at once
        hc = HealthChecker(ws, interval=0.6)  # re-probes 0.1 s apart
        ws.probe_round = 4
        await hc.check(w)  # one round's check, without waiting 3 intervals
        return w
    w = aio.run(run())
    assert w.circuit == "open" and w.fails == 3 and w.last_ejection["stalled"] is False
    assert (w.last_ejection["first_failed_round"], w.last_ejection["round"]) == (4, 4)


def _slow_health_server(delay: float) -> tuple[int, threading.Thread]:
    """A thread that answers one /health after ``delay`` s (while the test blocks its own event loop)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(10)

    def serve() -> None:
        with lsock:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(10)
                conn.recv(65536)
                time.sleep(delay)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                conn.recv(1)  # until the client closes
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return lsock.getsockname()[1], t


def test_a_late_router_loop_is_not_taken_for_a_stalled_worker():
    from hpcserve.router.health import HealthChecker
    from hpcserve.router.workers import WorkerSet
    port, thread = _slow_health_server(0.1)

    async def run():
        ws = WorkerSet("aggregated")
        w = ws.add_static("both", f"http://127.0.0.1:{port}")
        hc = HealthChecker(ws, interval=0.3)
        probe = asyncio.ensure_future(hc.probe(w))
        while not w.pool.watchdog.active:  # until the probe request is sent
            await asyncio.sleep(0.005)
        # this loop blocks past the probe timeout (CPU starved, a pause); the answer comes in meanwhile
        time.sleep(0.6)
        ok = await probe
        ws.close()
        return ok, w
    ok, w = aio.run(run())
    thread.join(10)
    assert ok is True and w.circuit == "closed" and w.fails == 0
