"""The load generator's stream parsing and accounting, against a small real SSE server on 127.0.0.1.

The server streams exactly what a test asks for (header X-Mode), so token counts and error texts are known.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web

from hpcserve.bench import loadgen
from hpcserve.bench.loadgen import resolve_target, run_level, send_request
from hpcserve.bench.workload import BenchError, RequestSpec, random_requests


BODIES = web.AppKey("bodies", list)


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


async def generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    mode = request.headers.get("X-Mode", "meta")
    n = body["sampling_params"]["max_new_tokens"]
    request.app[BODIES].append(body)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    step = 2 if mode == "multi" else 1
    text = ""
    for i in range(step, n + 1, step):
        await asyncio.sleep(0.002)
        text += "ab"[i % 2] * step
        if mode == "error-mid" and i == 3:
            await resp.write(sse({"error": {"message": "KV transfer failed", "code": 500}}))
            break
        chunk = {"text": text}
        if mode != "nometa":
            chunk["meta_info"] = {"completion_tokens": i, "prompt_tokens": len(body.get("input_ids", []))}
        await resp.write(sse(chunk))
        if mode == "long-line" and i == 1:
            await resp.write(sse({"text": text + "x" * 300_000, "meta_info": {"completion_tokens": 1}}))
    await resp.write(sse(b"[DONE]"))
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[BODIES].append(body)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(body["max_tokens"]):
        await resp.write(sse({"choices": [{"index": 0, "text": f"t{i}"}]}))
    await resp.write(sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": body["max_tokens"]}}))
    await resp.write(sse(b"[DONE]"))
    return resp


async def models(request: web.Request) -> web.Response:
    return web.json_response({"data": [{"id": "tiny-model"}]})


async def with_server(fn):
    """Start the SSE server on a free port, run ``fn(base_url, app)``, always stop the server."""
    app = web.Application()
    app[BODIES] = []
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await asyncio.wait_for(fn(f"http://127.0.0.1:{port}", app), timeout=60)
    finally:
        await runner.cleanup()


def one(mode: str, osl: int = 6, api: str = "generate", spec: RequestSpec | None = None):
    async def go(base, app):
        target = resolve_target(base, api, timeout_s=10, headers={"X-Mode": mode})
        async with loadgen.make_session(4, 10) as s:
            if api == "completions":
                target = loadgen.Target(**{**target.__dict__, "model": await loadgen.fetch_model_name(s, target)})
            r = await send_request(s, target, spec or RequestSpec(input_ids=(11, 12, 13), output_len=osl))
        return r, app[BODIES][-1] if app[BODIES] else None
    return asyncio.run(with_server(go))


def test_generate_counts_tokens_from_meta_info_and_sends_forced_length():
    r, body = one("meta", osl=6)
    assert r.ok and r.error == ""
    assert r.output_tokens == 6 and r.prompt_tokens == 3 and r.requested_tokens == 6
    assert len(r.itl) == 5 and r.ttft > 0 and r.e2e >= r.ttft + sum(r.itl) * 0.99
    assert body["input_ids"] == [11, 12, 13] and body["stream"] is True
    assert body["sampling_params"] == {"max_new_tokens": 6, "ignore_eos": True, "min_new_tokens": 6}


def test_generate_without_meta_info_counts_growing_chunks():
    r, _ = one("nometa", osl=5)
    assert r.ok and r.output_tokens == 5 and len(r.itl) == 4


def test_multi_token_chunks_split_the_gap():
    r, _ = one("multi", osl=8)
    assert r.ok and r.output_tokens == 8
    assert len(r.itl) == 6  # chunks at 2,4,6,8 -> 3 gaps, each split over 2 tokens
    assert r.itl[0] == r.itl[1] and r.itl[2] == r.itl[3]


def test_mid_stream_error_fails_the_request_with_the_server_message():
    r, _ = one("error-mid", osl=6)
    assert not r.ok and r.error == "server error: KV transfer failed" and r.output_tokens == 2


def test_long_sse_line_is_read():
    r, _ = one("long-line", osl=3)
    assert r.ok and r.output_tokens == 3


def test_http_error_is_recorded_with_status():
    async def go(base, app):
        target = resolve_target(base + "/nowhere", "generate", timeout_s=10)
        async with loadgen.make_session(1, 10) as s:
            return await send_request(s, target, RequestSpec(input_ids=(1,), output_len=2))
    r = asyncio.run(with_server(go))
    assert not r.ok and r.error.startswith("HTTP 404")


def test_connection_refused_is_an_error_not_an_exception():
    async def go():
        target = resolve_target("http://127.0.0.1:9", "generate", timeout_s=5)
        async with loadgen.make_session(1, 5) as s:
            return await send_request(s, target, RequestSpec(input_ids=(1,), output_len=2))
    r = asyncio.run(go())
    assert not r.ok and "Connect" in r.error


def test_completions_api_uses_usage_and_model_from_v1_models():
    r, body = one("meta", osl=4, api="completions", spec=RequestSpec(prompt="hi", output_len=4))
    assert r.ok and r.output_tokens == 4 and r.prompt_tokens == 5 and len(r.itl) == 3
    assert body["model"] == "tiny-model" and body["prompt"] == "hi" and body["max_tokens"] == 4
    assert body["ignore_eos"] is True and body["min_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True}


def test_run_level_returns_results_in_order_with_poisson_arrivals():
    async def go(base, app):
        target = resolve_target(base, timeout_s=10)
        specs = random_requests(6, 4, 3, seed=0, tag="t")
        seen = []
        async with loadgen.make_session(2, 10) as s:
            res, dur = await run_level(s, target, specs, concurrency=2, request_rate=200.0,
                                       on_result=lambda r: seen.append(r.ok))
        return res, dur, [b["input_ids"] for b in app[BODIES]], specs, seen
    res, dur, sent, specs, seen = asyncio.run(with_server(go))
    assert len(res) == 6 and all(r.ok and r.output_tokens == 3 for r in res) and seen == [True] * 6
    assert sorted(map(tuple, sent)) == sorted(s.input_ids for s in specs)
    assert dur > 0


@pytest.mark.parametrize("url,api,endpoint,kind", [
    ("http://h:1", "auto", "http://h:1/generate", "generate"),
    ("http://h:1/", "completions", "http://h:1/v1/completions", "completions"),
    ("http://h:1/v1/completions", "auto", "http://h:1/v1/completions", "completions"),
    ("http://h:1/x/generate/", "generate", "http://h:1/x/generate", "generate"),
])
def test_resolve_target(url, api, endpoint, kind):
    t = resolve_target(url, api)
    assert (t.endpoint, t.api) == (endpoint, kind)


def test_resolve_target_rejects_bad_urls():
    with pytest.raises(BenchError, match="not an http"):
        resolve_target("127.0.0.1:8000")
    with pytest.raises(BenchError, match="drop one of them"):
        resolve_target("http://h:1/generate", "completions")
