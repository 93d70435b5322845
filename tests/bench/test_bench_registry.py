"""The restart counter the benchmark stage passes in, over a real redis-server and the worker registry."""

from __future__ import annotations

import asyncio

import pytest
from proc_util import RedisProcess

from hpcserve.bench.validity import check_level, read_restarts, registry_restart_counter
from hpcserve.bench.stats import RequestResult
from hpcserve.registry import WorkerRecord, publish_worker, remove_worker

redis_asyncio = pytest.importorskip("redis.asyncio")


@pytest.fixture
def redis_url(tmp_path):
    server = RedisProcess(tmp_path).start()
    try:
        yield server.url
    finally:
        server.kill()


def worker(wid: str, restarts: int) -> WorkerRecord:
    return WorkerRecord(id=wid, role="both", group="workers", url="http://127.0.0.1:1", node=0, host="127.0.0.1",
                        state="ready", restarts=restarts)


def test_registry_restart_counter_sums_restarts_and_flags_a_change(redis_url):
    async def go():
        r = redis_asyncio.from_url(redis_url, socket_timeout=5)
        try:
            count = registry_restart_counter(r, "run1")
            empty = await read_restarts(count)
            await publish_worker(r, "run1", worker("w0", 0))
            await publish_worker(r, "run1", worker("w1", 2))
            await publish_worker(r, "other-run", worker("w9", 5))
            before = await read_restarts(count)
            await publish_worker(r, "run1", worker("w0", 1))  # the agent restarted w0 mid-level
            after = await read_restarts(count)
            await remove_worker(r, "run1", "w1")
            removed = await read_restarts(count)
            return empty, before, after, removed
        finally:
            await r.aclose()

    empty, before, after, removed = asyncio.run(go())
    assert (empty, before, after, removed) == (0, 2, 3, 1)
    ok = [RequestResult(ok=True, output_tokens=4, requested_tokens=4, ttft=0.1, e2e=0.2, itl=[0.03] * 3)]
    assert check_level(ok, restarts_before=before, restarts_after=before) == []
    assert check_level(ok, restarts_before=before, restarts_after=after) == [
        "worker restart during the level (registry restart count 2 -> 3)"]
