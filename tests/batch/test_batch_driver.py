"""run_batch against a small real HTTP server on 127.0.0.1 that answers like SGLang and misbehaves on cue.

Prompts steer the server: "fail503:<k>" answers 503 to the first k attempts, "always503" always does,
"bad400" gets a 400, "garble" a 200 that is not JSON, "slow" waits 30 s. Every request is counted.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time

import orjson
import pytest
from aiohttp import web
from proc_util import RedisProcess

from hpcserve.batch.driver import detect_complete, run_batch
from hpcserve.batch.merge import merge, part_path
from hpcserve.batch.progress import RedisStatus


class FakeEngine:
    def __init__(self) -> None:
        self.attempts: collections.Counter[str] = collections.Counter()
        self.models_calls = 0
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.closing = asyncio.Event()

    async def start(self) -> "FakeEngine":
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.closing.set()
        await self.runner.cleanup()

    async def _misbehave(self, key: str) -> web.Response | None:
        self.attempts[key] += 1
        if key.startswith("fail503:") and self.attempts[key] <= int(key.split(":")[1].split("/")[0]):
            return web.json_response({"error": {"message": "busy"}}, status=503)
        if key.startswith("always503"):
            return web.json_response({"error": {"message": "down"}}, status=503)
        if key.startswith("bad400"):
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        if key.startswith("garble"):
            return web.Response(body=b"<html>", status=200)
        if key.startswith("slow"):
            try:
                await asyncio.wait_for(self.closing.wait(), 30)
            except asyncio.TimeoutError:
                pass
        return None

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body.get("text") or " ".join(map(str, body["input_ids"]))
        bad = await self._misbehave(prompt)
        if bad is not None:
            return bad
        n = body["sampling_params"].get("max_new_tokens", 4)
        return web.json_response({"text": prompt[::-1][:n], "meta_info": {
            "prompt_tokens": len(prompt), "completion_tokens": n, "finish_reason": {"type": "length"}}})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") != "fake-model":
            return web.json_response({"error": {"message": "model not found"}}, status=404)
        content = body["messages"][-1]["content"]
        bad = await self._misbehave(content)
        if bad is not None:
            return bad
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": content.upper()},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 2}})

    async def models(self, request: web.Request) -> web.Response:
        self.models_calls += 1
        return web.json_response({"data": [{"id": "fake-model"}]})


def read_out(path) -> list[dict]:
    return [orjson.loads(x) for x in open(path, "rb").read().splitlines()]


def by_id(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        assert str(r["id"]) not in out, f"id {r['id']} written twice"
        r.pop("latency_s", None)
        out[str(r["id"])] = r
    return out


def write_input(path, rows: list) -> None:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows))


async def with_engine(fn):
    eng = await FakeEngine().start()
    try:
        return await fn(eng)
    finally:
        await eng.stop()


FAST = dict(concurrency=4, max_retries=2, request_timeout=10, backoff_base=0.01)


def test_mixed_rows_each_answered_once_with_retries_and_error_rows(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, [
        {"id": "p", "prompt": "hello", "max_tokens": 3},
        {"id": "c", "messages": [{"role": "user", "content": "hi"}]},
        {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}},  # id = line 3
        b'{"id": "broken", "prompt": ',  # line 4: malformed, id = 4
        {"id": "p", "prompt": "duplicate id"},
        {"id": "r", "prompt": "fail503:2"},
        {"id": "b", "prompt": "bad400"},
        {"id": "g", "prompt": "garble"},
        {"id": "d", "prompt": "always503"},
        {"id": "z", "prompt": "last"},
    ])

    async def go(eng):
        s = await run_batch(inp, out, eng.url, **FAST)
        return s, eng.attempts.copy(), eng.models_calls

    s, attempts, models_calls = asyncio.run(with_engine(go))
    rows = by_id(read_out(out))
    assert set(rows) == {"p", "c", "3", "4", "r", "b", "g", "d", "z"}
    assert rows["p"]["text"] == "oll" and rows["p"]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3}
    assert rows["c"]["text"] == "HI" and rows["3"]["text"] == "3 "
    assert "line 4: not valid JSON" in rows["4"]["error"]
    assert rows["r"]["text"] == "2:30"  # "fail503:2" reversed, default 4 tokens
    assert "HTTP 400: bad prompt" in rows["b"]["error"] and attempts["bad400"] == 1
    assert rows["g"]["error"] == "/generate: answer is not JSON: <html>"
    assert "failed after 3 attempts: HTTP 503: down" in rows["d"]["error"] and attempts["always503"] == 3
    assert attempts["fail503:2"] == 3 and attempts["duplicate id"] == 0 and models_calls == 1
    assert (s.ok, s.failed, s.duplicates, s.already_done, s.abandoned, s.total) == (5, 4, 1, 0, 0, 10)
    assert s.complete and not s.stopped and not s.aborted


def test_resume_skips_written_ids_and_repairs_a_torn_tail(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, [{"id": i, "prompt": f"row {i}"} for i in range(50)])

    async def go(eng):
        await run_batch(inp, tmp_path / "full.jsonl", eng.url, **FAST)
        eng.attempts.clear()
        first = read_out(tmp_path / "full.jsonl")[:20]
        out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in first) + b'{"id": 20, "te')
        s = await run_batch(inp, out, eng.url, **FAST)
        return s, eng.attempts.copy()

    s, attempts = asyncio.run(with_engine(go))
    assert s.repaired_bytes == len(b'{"id": 20, "te') and (s.already_done, s.ok) == (20, 30)
    assert sum(attempts.values()) == 30 and attempts["row 19"] == 0 and attempts["row 20"] == 1
    assert by_id(read_out(out)) == by_id(read_out(tmp_path / "full.jsonl"))
    assert detect_complete(inp, out) and not detect_complete(inp, tmp_path / "nothing.jsonl")


def test_detect_complete_is_false_with_one_row_missing(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, [{"id": i, "prompt": "x"} for i in range(3)] + [b"junk"])
    out.write_bytes(b'{"id":0,"text":""}\n{"id":"1","text":""}\n{"id":4,"error":"junk"}\n')
    assert not detect_complete(inp, out)
    with open(out, "ab") as f:
        f.write(b'{"id":2,"text":""}\n')
    assert detect_complete(inp, out)
    assert detect_complete(inp, out, 1, 2) and detect_complete(inp, out, 0, 2)


def test_stop_event_abandons_slow_rows_and_a_rerun_finishes_them(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, [{"id": i, "prompt": "slow" if i % 10 == 5 else f"quick {i}"} for i in range(40)])

    async def go(eng):
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        s = await run_batch(inp, out, eng.url, stop_event=stop, stop_grace=0.2, **FAST)
        return s

    s = asyncio.run(with_engine(go))
    written = by_id(read_out(out))
    assert s.stopped and not s.complete and s.abandoned >= 4 and not s.aborted
    assert len(written) == s.ok + s.failed and "5" not in written
    write_input(inp, [{"id": i, "prompt": f"quick {i}"} for i in range(40)])  # the server got faster

    s2 = asyncio.run(with_engine(lambda eng: run_batch(inp, out, eng.url, **FAST)))
    assert s2.complete and s2.already_done == len(written) and s2.ok == 40 - len(written)
    assert sorted(map(int, by_id(read_out(out)))) == list(range(40))


def test_unreachable_router_aborts_without_writing_error_rows(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, [{"id": i, "prompt": "x"} for i in range(100)])
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    s = asyncio.run(run_batch(inp, out, url, abort_after_failures=8, **FAST))
    assert s.aborted and "rows in a row failed" in s.aborted and "Connect" in s.aborted
    assert not s.complete and s.ok == s.failed == 0 and out.read_bytes() == b""


def test_three_shards_merged_equal_one_shard(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_input(inp, [{"id": f"k{i}", "prompt": f"prompt {i}"} for i in range(30)] + [b"{bad"])

    async def go(eng):
        await run_batch(inp, tmp_path / "one.jsonl", eng.url, **FAST)
        sums = [await run_batch(inp, part_path(tmp_path / "three.jsonl", i, 3), eng.url,
                                shard_index=i, num_shards=3, **FAST) for i in range(3)]
        return sums

    sums = asyncio.run(with_engine(go))
    assert [s.total for s in sums] == [11, 10, 10] and all(s.complete for s in sums)
    merge(inp, tmp_path / "three.jsonl", [part_path(tmp_path / "three.jsonl", i, 3) for i in range(3)])
    merge(inp, tmp_path / "one-merged.jsonl", [str(tmp_path / "one.jsonl")])
    three, one = read_out(tmp_path / "three.jsonl"), read_out(tmp_path / "one-merged.jsonl")
    assert [r["id"] for r in three] == [f"k{i}" for i in range(30)] + [31]
    for r in three + one:
        r.pop("latency_s", None)
    assert three == one


def test_progress_goes_to_the_status_hash_in_a_real_redis(tmp_path):
    import redis as redis_sync
    import redis.asyncio as aioredis

    server = RedisProcess(tmp_path).start()
    try:
        client = redis_sync.Redis.from_url(server.url, socket_timeout=5)
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_input(inp, [{"id": i, "prompt": "x"} for i in range(20)] + [b"nope"])
        seen: list[int] = []

        async def go(eng):
            r = aioredis.from_url(server.url, socket_timeout=5)
            try:
                return await run_batch(inp, out, eng.url, status=RedisStatus(r, "run1"),
                                       progress=lambda s: seen.append(s.done), **FAST)
            finally:
                await r.aclose()

        asyncio.run(with_engine(go))
        fields = {k.decode(): v.decode() for k, v in client.hgetall("hpcserve:run1:status").items()}
        assert (fields["batch_state"], fields["batch_done"], fields["batch_failed"],
                fields["batch_total"], fields["batch_shard"]) == ("complete", "21", "1", "21", "0/1")
        assert float(fields["batch_rows_per_s"]) > 0 and seen[-1] == 21
    finally:
        server.kill()


def test_a_second_driver_on_the_same_output_is_refused(tmp_path):
    from hpcserve.errors import HpcserveError

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, [{"id": i, "prompt": "slow"} for i in range(4)])

    async def go(eng):
        stop = asyncio.Event()
        first = asyncio.create_task(run_batch(inp, out, eng.url, stop_event=stop, stop_grace=0, **FAST))
        deadline = time.monotonic() + 10
        while eng.attempts["slow"] < 4:  # the first driver holds the output and has rows in flight
            assert time.monotonic() < deadline, "the first driver never sent its rows"
            await asyncio.sleep(0.01)
        with pytest.raises(HpcserveError, match="another batch driver is writing"):
            await run_batch(inp, out, eng.url, **FAST)
        stop.set()
        return await asyncio.wait_for(first, 10)

    s = asyncio.run(with_engine(go))
    assert s.stopped and s.abandoned == 4 and out.read_bytes() == b""
