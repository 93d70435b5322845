"""Following the Redis worker registry with a real redis-server."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import redis.asyncio as aioredis
from proc_util import RedisProcess

from hpcserve import registry
from hpcserve.registry import WorkerRecord
from router_util import RouterProc, bootstrap_port, start_pd, wait_until

PASSWORD = "pw-Zx81-secret"
RUN = "rt1"


@pytest.fixture
def redis_url(tmp_path):
    server = RedisProcess(tmp_path, password=PASSWORD).start()
    yield server.url, server
    server.kill()


def _run(coro):
    return asyncio.run(coro)


def _record(wid: str, role: str, mock, state: str = "ready") -> WorkerRecord:
    bp = int(bootstrap_port(mock)) if role == "prefill" else None
    return WorkerRecord(id=wid, role=role, group=role, url=mock.url, bootstrap_port=bp, node=0, host="127.0.0.1",
                        state=state, started_at=time.time())


async def _publish(url: str, rec: WorkerRecord, ttl: float = 60.0) -> None:
    r = aioredis.from_url(url)
    try:
        await registry.publish_worker(r, RUN, rec, hb_ttl=ttl)
    finally:
        await r.aclose()


async def _remove(url: str, wid: str) -> None:
    r = aioredis.from_url(url)
    try:
        await registry.remove_worker(r, RUN, wid)
    finally:
        await r.aclose()


def _ids(router: RouterProc) -> set[str]:
    return {w["id"] for w in router.workers()["workers"]}


def test_notifications_add_and_remove_workers(tmp_path, redis_url):
    url, _ = redis_url
    prefill, decode = start_pd(tmp_path, 1, 1)
    router = None
    try:
        # A slow rescan: changes can only show up this quickly through the pub/sub notifications.
        router = RouterProc(["--mode", "pd", "--redis-url", url, "--run-id", RUN, "--registry-rescan", "60"],
                            tmp_path, wait_ready=False)
        assert httpx.get(router.url + "/ready", timeout=5).status_code == 503
        _run(_publish(url, _record("p0", "prefill", prefill)))
        _run(_publish(url, _record("d0", "decode", decode, state="starting")))
        wait_until(lambda: _ids(router) == {"p0"}, 5, what="p0 only (d0 is still starting)")
        _run(_publish(url, _record("d0", "decode", decode)))
        wait_until(lambda: _ids(router) == {"p0", "d0"}, 5, what="d0 once ready")
        r = httpx.post(router.url + "/generate", json={"text": "via registry"}, timeout=20)
        assert r.status_code == 200, r.text
        view = router.workers()
        assert view["registry"]["connected"] is True and PASSWORD not in str(view)
        assert view["registry"]["url"].startswith("redis://:***@")
        _run(_remove(url, "d0"))
        wait_until(lambda: _ids(router) == {"p0"}, 5, what="d0 removed")
        assert httpx.post(router.url + "/generate", json={"text": "x"}, timeout=10).status_code == 503
        _run(_publish(url, _record("p0", "prefill", prefill, state="draining")))
        # a draining worker stays listed (its in-flight requests are counted) but out of rotation
        wait_until(lambda: [(w["id"], w["rotation"], w["healthy"]) for w in router.workers()["workers"]]
                   == [("p0", False, True)], 5, what="draining p0 leaves the rotation")
        assert router.workers()["workers"][0]["inflight"] == 0
    finally:
        if router is not None:
            router.stop()
            assert PASSWORD not in router.log.read_text()
        prefill.stop()
        decode.stop()


def test_expired_heartbeat_and_redis_outage(tmp_path, redis_url):
    url, redis_proc = redis_url
    prefill, decode = start_pd(tmp_path, 1, 1)
    router = None
    try:
        router = RouterProc(["--mode", "pd", "--redis-url", url, "--run-id", RUN, "--registry-rescan", "0.3"],
                            tmp_path, wait_ready=False)
        _run(_publish(url, _record("p0", "prefill", prefill)))
        _run(_publish(url, _record("d0", "decode", decode)))
        _run(_publish(url, _record("d1", "decode", decode), ttl=0.5))  # nobody renews this heartbeat
        wait_until(lambda: _ids(router) == {"p0", "d0", "d1"}, 5, what="all three")
        wait_until(lambda: _ids(router) == {"p0", "d0"}, 5, what="d1 dropped after its heartbeat expired")

        redis_proc.kill()
        wait_until(lambda: router.workers()["registry"]["connected"] is False, 10, what="outage noticed")
        for i in range(3):  # the last view keeps serving
            r = httpx.post(router.url + "/generate", json={"text": f"during outage {i}"}, timeout=20)
            assert r.status_code == 200, r.text
        assert _ids(router) == {"p0", "d0"}
        assert PASSWORD not in router.log.read_text()
        assert "***" in router.log.read_text()  # the outage was logged, redacted
    finally:
        if router is not None:
            router.stop()
        prefill.stop()
        decode.stop()


async def _flushall(url: str) -> None:
    r = aioredis.from_url(url)
    try:
        await r.flushall()
    finally:
        await r.aclose()


def _send_until(url: str, stop: threading.Event, results: list[int]) -> None:
    while not stop.is_set():
        try:
            results.append(httpx.post(url + "/generate", json={"text": "through a restart"}, timeout=20).status_code)
        except httpx.HTTPError as err:
            results.append(-1)
            print("request failed:", err)


@pytest.mark.parametrize("how", ["restart", "flush"])
def test_redis_emptied_keeps_workers_until_agents_reregister(tmp_path, redis_url, how):
    """Redis comes back empty right after the router learned its workers by pub/sub alone: restarted (the
    router's connection breaks) or flushed (it does not: nothing tells the router). The view keeps every
    worker and serves throughout; the re-registered ones stay, the one nobody re-registers is dropped once
    the grace is over."""
    url, redis_proc = redis_url
    prefill, decode = start_pd(tmp_path, 1, 1)
    decode_other = None
    router = None
    stop, results = threading.Event(), []
    try:
        decode_other = start_pd(tmp_path, 0, 1)[0]
        router = RouterProc(["--mode", "pd", "--redis-url", url, "--run-id", RUN, "--registry-rescan", "0.2"],
                            tmp_path, wait_ready=False)
        # learned by pub/sub only, then at once a restart: no wait for a rescan first
        _run(_publish(url, _record("p0", "prefill", prefill)))
        _run(_publish(url, _record("d0", "decode", decode)))
        _run(_publish(url, _record("d1", "decode", decode_other)))
        wait_until(lambda: _ids(router) == {"p0", "d0", "d1"}, 5, what="all three")
        sender = threading.Thread(target=_send_until, args=(router.url, stop, results), daemon=True)
        sender.start()
        wait_until(lambda: len(results) >= 5, 10, what="load running")
        if how == "restart":
            redis_proc.kill()
            redis_proc.proc.wait(5)
            redis_proc.start()          # same port and password, empty
        else:
            _run(_flushall(url))
        log = router.log
        wait_until(lambda: "does not list" in log.read_text(), 10, what="a rescan of the empty registry")
        assert _ids(router) == {"p0", "d0", "d1"}
        n = len(results)
        wait_until(lambda: len(results) >= n + 5, 10, what="serving from the kept view")
        # the agents of p0 and d0 re-register; d1's agent is gone
        _run(_publish(url, _record("p0", "prefill", prefill)))
        _run(_publish(url, _record("d0", "decode", decode)))
        wait_until(lambda: _ids(router) == {"p0", "d0"}, 30, what="d1 dropped after the grace")
        assert "worker d1 removed: the registry has not listed it for" in log.read_text()
        n = len(results)
        wait_until(lambda: len(results) >= n + 5, 10, what="serving after the grace")
        stop.set()
        sender.join(30)
        assert results and set(results) == {200}, results.count(200)
        assert "worker p0 removed" not in log.read_text() and "worker d0 removed" not in log.read_text()
    finally:
        stop.set()
        if router is not None:
            router.stop()
        for p in (prefill, decode, decode_other):
            if p is not None:
                p.stop()
