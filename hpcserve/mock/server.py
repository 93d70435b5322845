"""HTTP API of the mock engine: SGLang's native endpoints, info/health/metrics, and the route table.

The OpenAI endpoints live in openai_api.py. Request handling is kept lean (one dict lookup per route, orjson,
requests that need no waiting are answered synchronously, without a task) so that an instant mock
answers thousands of req/s.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from urllib.parse import unquote

import orjson

from hpcserve.engine_shell.errors import EngineError, error_body
from hpcserve.engine_shell.oai_protocol import ApiError, model_card, model_not_found
from hpcserve.engine_shell.tokenizer import VOCAB_SIZE
from hpcserve.http import HttpConnection, Request
from hpcserve.mock.engine import Engine, Job
from hpcserve.mock.model import (
    input_logprobs, input_top_logprobs, output_logprobs, output_top_logprobs,
)
from hpcserve.mock.native import plan_native
from hpcserve.mock.stats import Stats

VERSION = "0.5.0-mock"
SSE = b"text/event-stream"
SSE_HEADERS = b"cache-control: no-cache\r\n"
DONE = b"data: [DONE]\n\n"
_OPEN_PATHS = {b"/health", b"/health_generate", b"/metrics", b"/mock/stats"}
_GENERATE_PATHS = {b"/generate", b"/v1/completions", b"/v1/chat/completions"}


async def run_all(engine: Engine, jobs: list[Job], make_cb=None, on_done=None) -> None:
    """Execute the jobs of one request; one failure cancels the rest (no orphan writes after it)."""
    async def one(i: int, job: Job) -> None:
        await engine.execute(job, make_cb(i, job) if make_cb else None)
        if on_done is not None:
            on_done(i, job)

    if len(jobs) == 1:
        await one(0, jobs[0])
        return
    tasks = [asyncio.ensure_future(one(i, j)) for i, j in enumerate(jobs)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def header(req: Request, name: bytes) -> bytes | None:
    """A request header by lower-case name, whichever way the HTTP layer keeps them (dict or raw head)."""
    headers = getattr(req, "headers", None)
    if headers is not None:
        return headers.get(name)
    lower = req.lower
    i = lower.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    end = lower.find(b"\r\n", start)
    return req.head[start:end if end >= 0 else len(lower)].strip()


class MockServer:
    def __init__(self, cfg, ranks) -> None:
        from hpcserve.mock.openai_api import OpenAIApi
        self.cfg = cfg
        self.ranks = ranks                      # multinode.Ranks: who joined
        self.stats = Stats(cfg.disaggregation_mode, cfg.served_model_name)
        self.engine = Engine(cfg, self.stats)
        self.ready_at = time.monotonic() + cfg.startup_delay
        self.created = int(time.time())
        self.api_key = cfg.api_key.encode() if cfg.api_key else None
        self._serving = False     # set once ready for good, so the hot path skips the check
        oa = OpenAIApi(self)
        self.routes = {
            b"/generate": self.generate, b"/v1/completions": oa.completions,
            b"/v1/chat/completions": oa.chat, b"/v1/models": self.models,
            b"/health": self.health, b"/health_generate": self.health,
            b"/model_info": self.model_info, b"/get_model_info": self.model_info,
            b"/server_info": self.server_info, b"/get_server_info": self.server_info,
            b"/flush_cache": self.flush_cache, b"/metrics": self.metrics, b"/mock/stats": self.mock_stats,
            b"/get_load": self.get_load, b"/abort_request": self.abort_request, b"/ping": self.health,
        }

    # ---- dispatch
    def handle(self, req: Request, conn: HttpConnection):
        """Answer at once (returns None) or return the coroutine that will answer (waits, streams, PD)."""
        route = self.routes.get(req.path)
        if route is None and req.path.startswith(b"/v1/models/"):
            route = self.model_card
        if route is None:
            path = req.path.decode("latin-1")
            self.stats.count(path if len(self.stats.requests) < 100 else "other")
            conn.respond(404, error_body(404, f"no route {path} on this mock engine", "NotFound"))
            return None
        if self.api_key is not None and req.path not in _OPEN_PATHS:
            auth = header(req, b"authorization") or b""
            if not hmac.compare_digest(auth, b"Bearer " + self.api_key):
                conn.respond(401, error_body(401, "Unauthorized: send Authorization: Bearer <api key>", "Unauthorized"))
                return None
        if not self._serving and req.path in _GENERATE_PATHS:
            why = self.ready()
            if why is not None:  # like an engine still loading: traffic before /health says ready is a bug
                self.stats.count(req.path.decode())
                self.stats.errors += 1
                conn.respond(503, error_body(503, f"mock engine not ready: {why}", "ServiceUnavailable"))
                return None
            self._serving = self.cfg.nnodes == 1  # a multi-node replica keeps checking (a rank may leave)
        return route(req, conn)

    async def handle_async(self, req: Request, conn: HttpConnection) -> None:
        """``handle`` for HTTP layers whose handlers must be coroutines."""
        pending = self.handle(req, conn)
        if pending is not None:
            await pending

    def ready(self) -> str | None:
        """None when ready, else why not."""
        if time.monotonic() < self.ready_at:
            return "starting up"
        return self.ranks.missing_reason()

    # ---- SGLang native /generate
    def native_jobs(self, body: dict) -> tuple[list[Job], bool]:
        return plan_native(self.cfg, self.engine, body)

    def native_result(self, job: Job, k: int | None, lp: bool, lp_text: bool, prev: int = 0) -> dict:
        """The /generate object after k tokens (k None = final). ``prev`` > 0 makes text/ids incremental."""
        final = k is None
        if final:
            k = job.n_out
        text = job.text if k >= job.n_out else job.comp.text_upto(k)
        ids = job.ids[prev:k]
        if prev:
            text = text[len(job.text if prev >= job.n_out else job.comp.text_upto(prev)):]
        meta = {"id": job.rid, "finish_reason": job.finish_reason if final else None,
                "prompt_tokens": job.prompt.n_tokens, "completion_tokens": k, "cached_tokens": job.cached,
                "e2e_latency": round(job.e2e if final else time.perf_counter() - job.t0, 6)}
        if final:
            meta["mock_timing"] = job.timing
        if lp:  # (top_logprobs_num, logprob_start_len); -1: output tokens only; a PD decode has no prompt pass
            top, start = lp
            start = job.prompt.n_tokens if start < 0 or self.engine.mode == "decode" else start
            meta["input_token_logprobs"] = input_logprobs(job.prompt, lp_text, start)
            meta["output_token_logprobs"] = output_logprobs(job.ids[:k], prev, lp_text)
            if top > 0:
                meta["input_top_logprobs"] = input_top_logprobs(job.prompt, top, lp_text, start)
                meta["output_top_logprobs"] = output_top_logprobs(job.ids[:k], prev, top, lp_text)
        return {"text": text, "output_ids": ids, "meta_info": meta}

    def generate(self, req: Request, conn: HttpConnection):
        stats = self.stats
        stats.count("/generate")
        try:
            body = orjson.loads(req.body)
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            jobs, batch = self.native_jobs(body)
        except ApiError as err:  # SGLang's /generate answers a ValueError with {"error": {"message": ...}}
            stats.errors += 1
            conn.respond(err.status, orjson.dumps({"error": {"message": err.message}}))
            return None
        except (ValueError, orjson.JSONDecodeError) as err:
            stats.errors += 1
            conn.respond(400, error_body(400, str(err)))
            return None
        except EngineError as err:
            stats.errors += 1
            conn.respond(err.status, error_body(err.status, err.message, err.kind))
            return None
        lp = body.get("return_logprob")
        if lp[0] if isinstance(lp, list) and lp else lp:
            top, start = body.get("top_logprobs_num") or 0, body.get("logprob_start_len")
            lp = (top[0] if isinstance(top, list) and top else top,
                  -1 if start is None else start[0] if isinstance(start, list) and start else start)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in lp):
                stats.errors += 1
                conn.respond(400, error_body(400, "top_logprobs_num and logprob_start_len must be integers"))
                return None
        else:
            lp = False
        lp_text = bool(body.get("return_text_in_logprobs"))
        if body.get("stream"):
            if self.engine.is_instant(jobs):
                self._generate_stream_now(conn, jobs, batch, lp, lp_text)
                return None
            return self._generate_stream(conn, jobs, batch, lp, lp_text)
        if self.engine.is_instant(jobs):  # the hot path of load tests: no task, no await
            for job in jobs:
                self.engine.execute_now(job)
            self._respond_native(conn, jobs, batch, lp, lp_text)
            return None
        return self._generate_wait(conn, jobs, batch, lp, lp_text)

    def _respond_native(self, conn: HttpConnection, jobs: list[Job], batch: bool, lp: bool, lp_text: bool) -> None:
        out = [self.native_result(j, None, lp, lp_text) for j in jobs]
        self.stats.responses_ok += 1
        conn.respond(200, orjson.dumps(out if batch else out[0]))

    async def _generate_wait(self, conn: HttpConnection, jobs: list[Job], batch: bool, lp: bool,
                             lp_text: bool) -> None:
        if await self.run_whole(conn, jobs, error_body):
            self._respond_native(conn, jobs, batch, lp, lp_text)

    async def run_whole(self, conn: HttpConnection, jobs: list[Job], error) -> bool:
        """Run the jobs of a request answered in one piece; an engine error is answered with ``error``'s
        body shape (native or OpenAI) and False returned."""
        stats = self.stats
        stats.inflight += 1
        try:
            await run_all(self.engine, jobs)
        except EngineError as err:
            stats.errors += 1
            conn.respond(err.status, error(err.status, err.message, err.kind))
            return False
        finally:
            stats.inflight -= 1
        return True

    def _native_chunk(self, job: Job, index: int, k: int | None, sent: list[int], batch: bool, lp: bool,
                      lp_text: bool) -> bytes:
        """One SSE event after k tokens (None = the final one); ``sent`` tracks increments per item."""
        incremental = self.cfg.incremental_streaming_output
        obj = self.native_result(job, k, lp, lp_text, sent[index] if incremental else 0)
        if batch:
            obj["index"] = index
        sent[index] = job.n_out if k is None else k
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _generate_stream_now(self, conn: HttpConnection, jobs: list[Job], batch: bool, lp: bool,
                             lp_text: bool) -> None:
        """Instant streaming: the same events, one per step, written at once (one syscall, no task)."""
        sent = [0] * len(jobs)
        parts = []
        for i, job in enumerate(jobs):
            self.engine.execute_now(job)
            parts.extend(self._native_chunk(job, i, k, sent, batch, lp, lp_text) for k in range(1, job.n_out))
            parts.append(self._native_chunk(job, i, None, sent, batch, lp, lp_text))
        parts.append(DONE)
        self.stats.responses_ok += 1
        conn.start_stream(200, SSE, SSE_HEADERS)
        conn.write(b"".join(parts))
        conn.end()

    async def _generate_stream(self, conn: HttpConnection, jobs: list[Job], batch: bool, lp: bool,
                               lp_text: bool) -> None:
        conn.start_stream(200, SSE, SSE_HEADERS)
        self.stats.inflight += 1
        sent = [0] * len(jobs)

        def make_cb(index: int, job: Job):
            async def on_tokens(k: int) -> None:
                if k < job.n_out:
                    conn.write(self._native_chunk(job, index, k, sent, batch, lp, lp_text))
                    await conn.drain()
            return on_tokens

        def on_done(index: int, job: Job) -> None:
            conn.write(self._native_chunk(job, index, None, sent, batch, lp, lp_text))

        try:
            await run_all(self.engine, jobs, make_cb, on_done)
            self.stats.responses_ok += 1
        except EngineError as err:
            self.stats.errors += 1
            conn.write(b"data: " + error_body(err.status, err.message, err.kind) + b"\n\n")
        finally:
            self.stats.inflight -= 1
        conn.write(DONE)
        conn.end()

    # ---- info, health, admin
    def health(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count(req.path.decode())
        why = self.ready()
        if why is None:
            conn.respond(200, b"", b"text/plain")
        else:
            conn.respond(503, error_body(503, f"mock engine not ready: {why}", "ServiceUnavailable"))

    def model_info_dict(self) -> dict:
        return {"model_path": self.cfg.model_path, "tokenizer_path": self.cfg.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default", "has_image_understanding": False,
                "has_audio_understanding": False, "model_type": "mock", "architectures": ["MockForCausalLM"],
                "served_model_name": self.cfg.served_model_name, "vocab_size": VOCAB_SIZE,
                "context_length": self.cfg.context_length}

    def model_info(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count(req.path.decode())
        conn.respond(200, orjson.dumps(self.model_info_dict()))

    def server_info(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count(req.path.decode())
        cfg = self.cfg
        info = {**cfg.server_args(), "version": VERSION, "mock": True, "mock_args": cfg.mock_args(),
                "argv": cfg.argv, "extra_args": cfg.extra_args, "pid": os.getpid(),
                "ranks": self.ranks.describe(), "ready": self.ready() is None,
                "internal_states": [{"last_gen_throughput": 0.0, "avg_spec_accept_length": None}],
                "max_total_num_tokens": cfg.context_length * cfg.max_running,
                "bootstrap_port": cfg.disaggregation_bootstrap_port if cfg.disaggregation_mode == "prefill" else None}
        if self.engine.kv_events is not None:  # where KV-aware routers subscribe (SGLang's /server_info key)
            info["kv_events"] = self.engine.kv_events.describe()
        conn.respond(200, orjson.dumps(info, default=str))

    def models(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count("/v1/models")
        card = model_card(self.cfg.served_model_name, self.created, self.cfg.context_length)
        conn.respond(200, orjson.dumps({"object": "list", "data": [card]}))

    def model_card(self, req: Request, conn: HttpConnection) -> None:
        """GET /v1/models/{id}: SGLang's ModelCard, or its 404 for another name."""
        self.stats.count("/v1/models/{id}")
        name = unquote(req.path[len(b"/v1/models/"):].decode("latin-1"))
        if name != self.cfg.served_model_name:
            conn.respond(404, orjson.dumps(model_not_found(name)))
            return
        conn.respond(200, orjson.dumps(model_card(name, self.created, self.cfg.context_length)))

    def flush_cache(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count("/flush_cache")
        self.engine.flush_cache()
        conn.respond(200, b"Cache flushed.\n", b"text/plain")

    def abort_request(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count("/abort_request")
        conn.respond(200, b"", b"text/plain")

    def get_load(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count("/get_load")
        running, queued = self.engine.running, self.engine.queued
        conn.respond(200, orjson.dumps([{"dp_rank": 0, "num_reqs": running + queued, "num_waiting_reqs": queued,
                                          "num_tokens": 0}]))

    def metrics(self, req: Request, conn: HttpConnection) -> None:
        self.stats.count("/metrics")
        kv = self.engine.kvcache
        body = self.stats.prometheus(self.engine.running, self.engine.queued, None if kv is None else kv.view())
        conn.respond(200, body, b"text/plain; version=0.0.4; charset=utf-8")

    def mock_stats(self, req: Request, conn: HttpConnection) -> None:
        snap = self.stats.snapshot(self.engine.running, self.engine.queued)
        if self.engine.kvcache is not None:
            snap["kv_cache"] = self.engine.kvcache.view()
        conn.respond(200, orjson.dumps(snap))
