"""Re-dispatch: a request whose worker dies (or is ejected as stalled) before the client got a byte is sent
again to another worker, a bounded number of times; in PD mode as a new PD request (fresh room). Real mock
engines and small real worker servers that break on purpose, all on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx

from hpcserve.mock.launch import MockProcess
from router_util import RouterProc, post_in_thread, bootstrap_port, free_port, start_pd, stats, wait_until

SLOW_DECODE = ["--mock-time-scale", "1", "--mock-decode-step-ms", "100"]
BODY = {"text": "move me", "sampling_params": {"max_new_tokens": 20, "temperature": 0}}


def _busy(procs: list[MockProcess]) -> MockProcess | None:
    running = [p for p in procs if stats(p)["running"] == 1]
    return running[0] if len(running) == 1 else None


def _signal_busy_worker(router: RouterProc, pair: tuple[MockProcess, MockProcess], sig: int):
    """Send one request, wait until one of ``pair`` runs it and send that worker ``sig``. Returns the
    request's thread (join it), its outcome dict, the signalled worker and the other one."""
    out: dict = {}
    t = post_in_thread(router.url, BODY, out, timeout=60)
    victim = wait_until(lambda: _busy(list(pair)), 10, what="the request running on one worker")
    os.kill(victim.pid, sig)
    return t, out, victim, pair[1] if victim is pair[0] else pair[0]


def _redispatches(router: RouterProc) -> dict[tuple[str, str], float]:
    out = {}
    for line in httpx.get(router.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("hpcserve_router_redispatches_total{"):
            labels, value = line[len("hpcserve_router_redispatches_total{"):].split("} ")
            kv = dict(item.split("=") for item in labels.split(","))
            out[(kv["role"].strip('"'), kv["reason"].strip('"'))] = float(value)
    return out


def test_aggregated_request_on_killed_worker_is_redispatched(tmp_path):
    a = MockProcess.start(["--disaggregation-mode", "null", *SLOW_DECODE], log_dir=tmp_path, wait="ready")
    b = MockProcess.start(["--disaggregation-mode", "null", *SLOW_DECODE], log_dir=tmp_path, wait="ready")
    router = None
    try:
        router = RouterProc(["--worker", a.url, "--worker", b.url, "--policy", "round_robin",
                             "--health-interval", "30"], tmp_path)
        t, out, victim, survivor = _signal_busy_worker(router, (a, b), signal.SIGKILL)
        t.join(60)
        assert out.get("status") == 200, out
        expected = httpx.post(survivor.url + "/generate", json=BODY, timeout=30).json()["text"]
        assert out["body"]["text"] == expected and expected
        assert stats(survivor)["requests"]["/generate"] == 2  # the moved request and ours
        assert _redispatches(router) == {("both", "worker_lost"): 1.0}
    finally:
        if router is not None:
            router.stop()
        a.stop()
        b.stop()


def test_pd_decode_killed_request_is_sent_again_as_a_new_pd_request(tmp_path):
    prefill, d1, d2 = start_pd(tmp_path, 1, 2, extra=SLOW_DECODE)
    router = None
    try:
        router = RouterProc(["--prefill", prefill.url, bootstrap_port(prefill), "--decode", d1.url, "--decode",
                             d2.url, "--decode-policy", "round_robin", "--health-interval", "30"], tmp_path)
        t, out, victim, survivor = _signal_busy_worker(router, (d1, d2), signal.SIGKILL)
        t.join(60)
        assert out.get("status") == 200, out
        # the prefill saw the text twice: the first room, then the new PD request's room (never a replay)
        assert stats(prefill)["requests"]["/generate"] == 2
        assert stats(survivor)["requests"]["/generate"] == 1
        again = httpx.post(router.url + "/generate", json=BODY, timeout=30).json()["text"]
        assert out["body"]["text"] == again and again  # deterministic: same text as an undisturbed request
        assert _redispatches(router) == {("decode", "worker_lost"): 1.0}
    finally:
        if router is not None:
            router.stop()
        for p in (prefill, d1, d2):
            p.stop()


# Workers that break on purpose: /generate closes the connection without an answer ("dies"), or, for a
# stream, sends the head and one event first. /health answers 200; /count says how many /generate came.
BREAKING_WORKERS = r"""
import asyncio, sys, json
from hpcserve.http import HttpServer
counts = {}
def make(port):
    def handle(req, conn):
        if req.path == b"/health":
            conn.respond(200, b"{}")
        elif req.path == b"/count":
            conn.respond(200, json.dumps(counts.get(port, 0)).encode())
        else:
            counts[port] = counts.get(port, 0) + 1
            if b'"stream": true' in req.body or b'"stream":true' in req.body:
                conn.start_stream(200, b"text/event-stream")
                conn.write(b'data: {"text": "partial"}\n\n')
                conn.uncork()
            conn.close()
    return handle
async def main():
    for p in sys.argv[1:]:
        await HttpServer(make(int(p))).start("127.0.0.1", int(p))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class BreakingWorkers:
    def __init__(self, n: int) -> None:
        self.ports = [free_port() for _ in range(n)]
        self.proc = subprocess.Popen([sys.executable, "-c", BREAKING_WORKERS, *map(str, self.ports)],
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == b"ready"
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]

    def counts(self) -> list[int]:
        return [httpx.get(u + "/count", timeout=5).json() for u in self.urls]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_redispatch_is_bounded(tmp_path):
    workers = BreakingWorkers(4)
    routers = []
    try:
        args = [a for u in workers.urls for a in ("--worker", u)] + ["--policy", "round_robin",
                                                                      "--health-interval", "30", "--eject-after", "100"]
        router = RouterProc(args, tmp_path)  # default --max-redispatch 2: three workers tried, then 502
        routers.append(router)
        r = httpx.post(router.url + "/generate", json={"text": "x"}, timeout=20)
        assert r.status_code == 502, r.text
        assert "closed the connection without answering" in r.json()["error"]["message"]
        assert sorted(workers.counts()) == [0, 1, 1, 1]
        assert _redispatches(router) == {("both", "worker_lost"): 2.0}
        router.stop()
        router = RouterProc(args + ["--max-redispatch", "0"], tmp_path)  # 0: the old behaviour, one try
        routers.append(router)
        before = sum(workers.counts())
        assert httpx.post(router.url + "/generate", json={"text": "x"}, timeout=20).status_code == 502
        assert sum(workers.counts()) - before == 1
        assert _redispatches(router) == {}
    finally:
        for router in routers:
            router.stop()
        workers.stop()


def test_stream_that_relayed_a_byte_is_not_redispatched(tmp_path):
    workers = BreakingWorkers(2)
    router = None
    try:
        router = RouterProc([a for u in workers.urls for a in ("--worker", u)] + ["--health-interval", "30"],
                            tmp_path)
        with httpx.stream("POST", router.url + "/generate", json={"text": "x", "stream": True}, timeout=20) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[0] == '{"text": "partial"}'
        assert "closed the connection mid-response" in json.loads(events[-1])["error"]["message"]
        assert len(events) == 2
        assert sorted(workers.counts()) == [0, 1]  # the client had a byte: never sent again
        assert _redispatches(router) == {}
    finally:
        if router is not None:
            router.stop()
        workers.stop()


def test_stalled_worker_ejected_within_two_rounds_and_its_request_moved(tmp_path):
    a = MockProcess.start(["--disaggregation-mode", "null", *SLOW_DECODE], log_dir=tmp_path, wait="ready")
    b = MockProcess.start(["--disaggregation-mode", "null", *SLOW_DECODE], log_dir=tmp_path, wait="ready")
    router = None
    stopped = None
    try:
        router = RouterProc(["--worker", a.url, "--worker", b.url, "--policy", "round_robin",
                             "--health-interval", "0.3", "--eject-after", "3"], tmp_path)
        t, out, victim, survivor = _signal_busy_worker(router, (a, b), signal.SIGSTOP)
        stopped = victim
        t.join(60)
        # answered while the worker is still stopped: the request was moved, not left waiting
        assert out.get("status") == 200, out
        view = next(w for w in router.workers()["workers"] if w["url"] == victim.url)
        ej = view["last_ejection"]
        assert view["circuit"] == "open" and ej["stalled"] is True, view
        # ejected in the round of its first failed probe or the next one (eject-after 3 would need 3 rounds)
        assert 0 <= ej["round"] - ej["first_failed_round"] <= 1, ej
        expected = httpx.post(survivor.url + "/generate", json=BODY, timeout=30).json()["text"]
        assert out["body"]["text"] == expected
        assert _redispatches(router) == {("both", "stalled"): 1.0}
        os.kill(victim.pid, signal.SIGCONT)
        stopped = None
        wait_until(lambda: next(w for w in router.workers()["workers"] if w["url"] == victim.url)["healthy"], 10,
                   what="readmission after SIGCONT")
    finally:
        if stopped is not None:
            os.kill(stopped.pid, signal.SIGCONT)
        if router is not None:
            router.stop()
        a.stop()
        b.stop()
