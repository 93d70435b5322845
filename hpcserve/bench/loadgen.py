"""The asyncio load generator: streaming requests against an SGLang-compatible URL, timed per token.

Two request shapes:
  generate      SGLang's native ``POST /generate`` with ``input_ids`` or ``text`` and ``sampling_params``;
                chunks carry cumulative text and ``meta_info.completion_tokens`` (used when present).
  completions   OpenAI ``POST /v1/completions`` (token-id or text prompt), for servers without /generate.
One pooled aiohttp session serves a whole run; every request has a total timeout.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable, Sequence
from urllib.parse import urlsplit

import aiohttp
import orjson

from hpcserve.bench.stats import RequestResult
from hpcserve.bench.workload import BenchError, RequestSpec

APIS = ("generate", "completions")
_API_PATHS = {"generate": "/generate", "completions": "/v1/completions"}
_ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class Target:
    """Where and how to send. ``endpoint`` is the full URL that requests are POSTed to."""

    endpoint: str
    api: str = "generate"
    model: str | None = None          # completions only; filled from /v1/models when absent
    force_output_len: bool = True     # ignore_eos + min tokens so every request produces exactly OSL tokens
    timeout_s: float = 600.0
    headers: dict[str, str] = field(default_factory=dict)


def resolve_target(url: str, api: str = "auto", **kw) -> Target:
    """A base URL gets the API's path appended; a URL that already ends in one picks the API."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BenchError(f"{url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    for name, suffix in _API_PATHS.items():
        if path.endswith(suffix):
            if api not in ("auto", name):
                raise BenchError(f"URL {url} is the {name} endpoint but --api {api} was given; drop one of them")
            return Target(endpoint=url.rstrip("/"), api=name, **kw)
    if api == "auto":
        api = "generate"
    if api not in APIS:
        raise BenchError(f"unknown --api {api!r}; use one of: {', '.join(APIS)}")
    return Target(endpoint=url.rstrip("/") + _API_PATHS[api], api=api, **kw)


def make_session(max_connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """One keep-alive pool sized for the largest level."""
    conn = aiohttp.TCPConnector(limit=max(1, max_connections), limit_per_host=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(30.0, timeout_s))
    return aiohttp.ClientSession(connector=conn, timeout=timeout, json_serialize=lambda o: orjson.dumps(o).decode())


async def fetch_model_name(session: aiohttp.ClientSession, target: Target) -> str:
    """The first model id from ``/v1/models`` next to the completions endpoint."""
    url = target.endpoint[: -len("/v1/completions")] + "/v1/models"
    try:
        async with session.get(url, headers=target.headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise BenchError(f"GET {url} returned HTTP {resp.status}; pass --model NAME")
            data = orjson.loads(body).get("data") or []
    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as e:
        raise BenchError(f"cannot list models at {url} ({type(e).__name__}: {e}); pass --model NAME") from None
    if not data:
        raise BenchError(f"{url} lists no models; pass --model NAME")
    return str(data[0]["id"])


async def probe_server(session: aiohttp.ClientSession, target: Target, timeout_s: float = 10.0) -> dict:
    """The server's /server_info (SGLang's, also proxied by the router), {} when it has none. A server that
    does not answer at all is a one-line BenchError before any level starts (no table of failed levels)."""
    base = target.endpoint.rsplit(_API_PATHS[target.api], 1)[0]
    try:
        async with session.get(base + "/server_info", headers=target.headers,
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await resp.read()
            info = orjson.loads(body) if resp.status == 200 else {}
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        os_err = getattr(e, "os_error", None)
        why = (f"no answer within {timeout_s:g}s" if isinstance(e, asyncio.TimeoutError)
               else (os_err.strerror if os_err is not None and os_err.strerror else None) or str(e) or type(e).__name__)
        raise BenchError(f"cannot reach {base} ({why}); start the deployment (hpcserve up, or submit --wait) "
                         f"or fix the URL") from None
    except orjson.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def timing_warning(info: dict) -> str | None:
    """Why the numbers are not a model's: the mock engine answering without a timing model (time scale 0)."""
    if info.get("mock") and not float((info.get("mock_args") or {}).get("time_scale") or 0):
        return ("the engine is the mock without a timing model (time-scale 0): latencies and tok/s measure "
                "only the HTTP path, not a model. Use recipes/local-demo-realistic.yaml or engine.mock "
                "time-scale: 1")
    return None


def request_body(target: Target, spec: RequestSpec) -> dict:
    n = spec.output_len
    if target.api == "generate":
        sp: dict = {"max_new_tokens": n}
        if target.force_output_len:
            sp.update(ignore_eos=True, min_new_tokens=n)
        body: dict = {"sampling_params": sp, "stream": True}
        if spec.input_ids is not None:
            body["input_ids"] = list(spec.input_ids)
        else:
            body["text"] = spec.prompt
        return body
    body = {"model": target.model, "max_tokens": n, "stream": True, "stream_options": {"include_usage": True},
            "prompt": list(spec.input_ids) if spec.input_ids is not None else spec.prompt}
    if target.force_output_len:
        body.update(ignore_eos=True, min_tokens=n)
    return body


class _StreamState:
    """Turns SSE events into token timings. Counts are cumulative per request."""

    def __init__(self, api: str, start: float, result: RequestResult) -> None:
        self.api, self.start, self.r = api, start, result
        self.tokens = 0
        self.last_token_at = start
        self.text_len = 0
        self.done = False

    def on_event(self, data: bytes, now: float) -> None:
        if data.strip() == b"[DONE]":
            self.done = True
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _StreamError(f"unparseable stream chunk: {data[:120]!r}") from None
        if not isinstance(msg, dict):
            return
        if msg.get("error"):
            err = msg["error"]
            raise _StreamError("server error: " + str(err.get("message", err) if isinstance(err, dict) else err))
        count = self._count_generate(msg) if self.api == "generate" else self._count_completions(msg)
        if count is not None and count > self.tokens:
            self._advance(count, now)

    def _count_generate(self, msg: dict) -> int | None:
        meta = msg.get("meta_info") or {}
        reason = meta.get("finish_reason")
        if isinstance(reason, dict) and reason.get("type") == "abort":
            raise _StreamError(f"request aborted: {reason.get('message', reason)}")
        if meta.get("prompt_tokens"):
            self.r.prompt_tokens = int(meta["prompt_tokens"])
        if meta.get("cached_tokens") is not None:
            self.r.cached_tokens = int(meta["cached_tokens"])
        if meta.get("completion_tokens") is not None:
            return int(meta["completion_tokens"])
        text = msg.get("text") or ""
        # Without meta_info: cumulative text, one new token per chunk whose text grew.
        if len(text) > self.text_len:
            self.text_len = len(text)
            return self.tokens + 1
        return None

    def _count_completions(self, msg: dict) -> int | None:
        usage = msg.get("usage") or {}
        if usage.get("prompt_tokens"):
            self.r.prompt_tokens = int(usage["prompt_tokens"])
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            self.r.cached_tokens = int(details["cached_tokens"])
        choices = msg.get("choices") or []
        if not choices:
            # the final usage-only chunk: the true total, with no timing of its own
            total = usage.get("completion_tokens")
            if total is not None and int(total) > self.tokens:
                self.tokens = int(total)
            return None
        if usage.get("completion_tokens") is not None:
            return int(usage["completion_tokens"])
        return self.tokens + 1 if choices[0].get("text") else None

    def _advance(self, count: int, now: float) -> None:
        new = count - self.tokens
        if self.tokens == 0:
            self.r.ttft = now - self.start
        else:
            gap = (now - self.last_token_at) / new
            self.r.itl.extend([gap] * new)
        self.tokens = count
        self.last_token_at = now


class _StreamError(Exception):
    pass


async def send_request(session: aiohttp.ClientSession, target: Target, spec: RequestSpec) -> RequestResult:
    """One streaming request, never raising: failures come back as ``ok=False`` with a reason."""
    r = RequestResult(prompt_tokens=spec.prompt_tokens,
                      requested_tokens=spec.output_len if target.force_output_len else None)
    body = orjson.dumps(request_body(target, spec))
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **target.headers}
    r.start = start = perf_counter()
    state = _StreamState(target.api, start, r)
    try:
        async with session.post(target.endpoint, data=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=target.timeout_s,
                                                              sock_connect=min(30.0, target.timeout_s))) as resp:
            if resp.status != 200:
                text = (await resp.content.read(_ERROR_BODY_CHARS)).decode("utf-8", "replace")
                r.error = f"HTTP {resp.status}: {' '.join(text.split())}"
                return r
            await _read_sse(resp, state)
        r.ok = True
    except _StreamError as e:
        r.error = str(e)
    except asyncio.TimeoutError:
        r.error = f"timeout after {target.timeout_s:g}s"
    except aiohttp.ClientError as e:
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.e2e = perf_counter() - start
        r.output_tokens = state.tokens
    return r


async def _read_sse(resp: aiohttp.ClientResponse, state: _StreamState) -> None:
    """Split the byte stream into ``data:`` lines ourselves: cumulative-text chunks can exceed
    aiohttp's line limit, and each chunk is stamped with the time its bytes arrived."""
    buf = bytearray()
    async for piece in resp.content.iter_any():
        now = perf_counter()
        buf += piece
        scan = 0
        while True:
            nl = buf.find(b"\n", scan)
            if nl < 0:
                break
            line = bytes(buf[scan:nl]).rstrip(b"\r")
            scan = nl + 1
            if line.startswith(b"data:"):
                state.on_event(line[5:].lstrip(), now)
                if state.done:
                    return
        del buf[:scan]
    if buf.strip().startswith(b"data:"):
        state.on_event(bytes(buf).strip()[5:].lstrip(), perf_counter())


async def run_level(session: aiohttp.ClientSession, target: Target, specs: Sequence[RequestSpec], *,
                    concurrency: int, request_rate: float | None = None, seed: int = 0,
                    on_result: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send ``specs`` with at most ``concurrency`` in flight; with ``request_rate`` (req/s) arrivals are
    Poisson (seeded) and wait for a free slot. Returns the results in spec order and the wall time from
    the first send to the last completion."""
    sem = asyncio.Semaphore(max(1, concurrency))
    arrivals = random.Random(f"{seed}:arrivals:{concurrency}")
    results: list[RequestResult | None] = [None] * len(specs)

    async def one(i: int, spec: RequestSpec) -> None:
        async with sem:
            res = await send_request(session, target, spec)
        results[i] = res
        if on_result is not None:
            on_result(res)

    t0 = perf_counter()
    tasks: list[asyncio.Task] = []
    try:
        for i, spec in enumerate(specs):
            if request_rate and i:
                await asyncio.sleep(arrivals.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(i, spec)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return [r for r in results if r is not None], perf_counter() - t0
