"""OpenAI-compatible endpoints of the mock: /v1/completions and /v1/chat/completions.

Shapes follow what the official ``openai`` client parses (and what SGLang returns): whole responses with
``usage``, streams of delta chunks ending in ``data: [DONE]``, a usage-only chunk when
``stream_options.include_usage`` is set, and SGLang's error object for bad requests. PD fields
(bootstrap_host/port/room) are read from the top level of the body, as a PD router adds them.
"""

from __future__ import annotations

import time

import orjson

from hpcserve.engine_shell import oai_protocol as proto
from hpcserve.engine_shell.errors import EngineError, oai_error
from hpcserve.engine_shell.tokenizer import OFFSET, Prompt, apply_chat_template, token_bytes, token_piece, token_text
from hpcserve.http import HttpConnection, Request
from hpcserve.mock.engine import Boot, Job, new_rid
from hpcserve.mock.model import SamplingParams, input_logprobs, input_top_logprobs, output_logprobs, output_top_logprobs
from hpcserve.mock.server import DONE, SSE, SSE_HEADERS, run_all


def _finish(job: Job) -> str:
    return "stop" if job.finish_reason.get("type") == "stop" else "length"


def _text_at(job: Job, k: int) -> str:
    return job.text if k >= job.n_out else job.comp.text_upto(k)


def _room(room, i: int, j: int, n_prompts: int, n: int):
    """Bootstrap room of sample j of prompt i: a single room counts up over all items (SGLang's
    normalisation); a per-prompt list gives sample j the room ``rooms[i] + j * n_prompts``."""
    if isinstance(room, list):
        r = room[i] if len(room) == n_prompts else None
        return r + j * n_prompts if j and isinstance(r, int) and not isinstance(r, bool) else r
    if isinstance(room, int) and not isinstance(room, bool):
        return room + i * n + j
    return room


class OpenAIApi:
    def __init__(self, server) -> None:
        self.server = server
        self.cfg = server.cfg
        self.engine = server.engine
        self.stats = server.stats

    def _jobs(self, body: dict, prompts: list[Prompt], chat: bool) -> list[Job]:
        n = body.get("n") or 1
        host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
        np_ = len(prompts)
        pick = (lambda v, i: v[i] if isinstance(v, list) and len(v) == np_ else v)
        d = {"temperature": body.get("temperature"), "top_p": body.get("top_p"), "seed": body.get("seed"),
             "stop": body.get("stop"), "stop_token_ids": body.get("stop_token_ids"),
             "min_new_tokens": body.get("min_tokens"), "ignore_eos": body.get("ignore_eos", False)}
        jobs = []
        for i, prompt in enumerate(prompts):
            if chat:  # no default cap: what is left of the context (SGLang leaves max_new_tokens unset)
                mt = proto.chat_max_tokens(body)
                d["max_new_tokens"] = max(self.cfg.context_length - prompt.n_tokens, 0) if mt is None else mt
            else:
                d["max_new_tokens"] = body.get("max_tokens", proto.COMPLETION_DEFAULT_MAX_TOKENS)
            sp = SamplingParams.from_dict(d, proto.COMPLETION_DEFAULT_MAX_TOKENS)
            for j in range(n):
                boot = None
                if (host, port, room) != (None, None, None):
                    boot = Boot(pick(host, i), pick(port, i), _room(room, i, j, np_, n))
                jobs.append(self.engine.plan(prompt, sp.sample(j), boot, None))
        return jobs

    def _serve(self, req: Request, conn: HttpConnection, endpoint: str, chat: bool):
        """Answer at once (None) or return the coroutine that answers, as MockServer.handle does."""
        stats = self.stats
        stats.count(endpoint)
        try:
            body = orjson.loads(req.body)
            if not isinstance(body, dict):
                raise proto.ApiError("the request body must be a JSON object", "Bad Request")
            if chat:
                proto.check_chat(body, self.cfg.served_model_name)
            else:
                proto.check_completion(body, self.cfg.served_model_name)
            prompts = self._chat_prompts(body) if chat else self._completion_prompts(body)
            jobs = self._jobs(body, prompts, chat)
        except proto.ApiError as err:
            stats.errors += 1
            conn.respond(err.status, oai_error(err.status, err.message, err.kind))
            return None
        except (ValueError, orjson.JSONDecodeError) as err:
            stats.errors += 1
            conn.respond(400, oai_error(400, str(err)))
            return None
        except EngineError as err:
            stats.errors += 1
            conn.respond(err.status, oai_error(err.status, err.message, err.kind))
            return None
        rid = ("chatcmpl-" if chat else "cmpl-") + new_rid()
        model = body.get("model") or self.cfg.served_model_name
        created = int(time.time())
        view = _View(body, jobs, chat, self.engine.mode == "decode")
        if body.get("stream"):
            sse = _Stream(view, rid, model, created).options(body)
            if self.engine.is_instant(jobs):
                self._stream_now(conn, sse, jobs)
                return None
            return self._stream(conn, sse, jobs)
        if self.engine.is_instant(jobs):
            for job in jobs:
                self.engine.execute_now(job)
            self._respond(conn, view, rid, model, created)
            return None
        return self._wait(conn, view, rid, model, created)

    async def _wait(self, conn: HttpConnection, view: "_View", rid: str, model: str, created: int) -> None:
        if await self.server.run_whole(conn, view.jobs, oai_error):
            self._respond(conn, view, rid, model, created)

    def _respond(self, conn: HttpConnection, view: "_View", rid: str, model: str, created: int) -> None:
        choices = [view.choice(i, job) for i, job in enumerate(view.jobs)]
        out = {"id": rid, "object": "chat.completion" if view.chat else "text_completion", "created": created,
               "model": model, "choices": choices, "usage": view.usage()}
        self.stats.responses_ok += 1
        conn.respond(200, orjson.dumps(out))

    def completions(self, req: Request, conn: HttpConnection):
        return self._serve(req, conn, "/v1/completions", chat=False)

    def chat(self, req: Request, conn: HttpConnection):
        return self._serve(req, conn, "/v1/chat/completions", chat=True)

    # ---- request -> prompts
    @staticmethod
    def _completion_prompts(body: dict) -> list[Prompt]:
        p = body.get("prompt")
        if isinstance(p, str):
            return [Prompt.from_text(p)]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return [Prompt.from_text(x) for x in p]
            if all(isinstance(x, int) for x in p):
                return [Prompt.from_ids(p)]
            if all(isinstance(x, list) for x in p):
                return [Prompt.from_ids(x) for x in p]
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of those")

    @staticmethod
    def _chat_prompts(body: dict) -> list[Prompt]:
        messages = body.get("messages")
        add = body.get("add_generation_prompt", True)
        return [Prompt.from_text(apply_chat_template(messages, bool(add)))]

    def _stream_now(self, conn: HttpConnection, sse: "_Stream", jobs: list[Job]) -> None:
        """Instant streaming: the same events, one per step, written at once (one syscall, no task)."""
        parts = [sse.head()]
        for i, job in enumerate(jobs):
            self.engine.execute_now(job)
            parts.extend(sse.chunk(i, job, k, False) for k in range(1, job.n_out))
            parts.append(sse.chunk(i, job, job.n_out, True))
        parts += [sse.usage(), DONE]
        self.stats.responses_ok += 1
        conn.start_stream(200, SSE, SSE_HEADERS)
        conn.write(b"".join(parts))
        conn.end()

    async def _stream(self, conn: HttpConnection, sse: "_Stream", jobs: list[Job]) -> None:
        conn.start_stream(200, SSE, SSE_HEADERS)
        self.stats.inflight += 1
        conn.write(sse.head())

        def make_cb(index: int, job: Job):
            async def on_tokens(k: int) -> None:
                if k < job.n_out:
                    conn.write(sse.chunk(index, job, k, False))
                    await conn.drain()
            return on_tokens

        def on_done(index: int, job: Job) -> None:
            conn.write(sse.chunk(index, job, job.n_out, True))

        try:
            await run_all(self.engine, jobs, make_cb, on_done)
            conn.write(sse.usage())
            self.stats.responses_ok += 1
        except EngineError as err:
            self.stats.errors += 1
            conn.write(b"data: " + orjson.dumps({"error": {"message": err.message, "type": err.kind,
                                                           "code": err.status}}) + b"\n\n")
        finally:
            self.stats.inflight -= 1
        conn.write(DONE)
        conn.end()


class _View:
    """How the choices of one OpenAI request look: echo, logprobs with top-N, n samples per prompt."""

    def __init__(self, body: dict, jobs: list[Job], chat: bool, decode_only: bool) -> None:
        self.jobs, self.chat = jobs, chat
        self.n = body.get("n") or 1
        if chat:
            self.lp = bool(body.get("logprobs"))
            self.top = (body.get("top_logprobs") or 0) if self.lp else 0
            self.echo = False
        else:
            lp = body.get("logprobs")
            self.lp = lp is not None
            self.top = lp or 0
            self.echo = bool(body.get("echo"))
        # prompt logprobs need a prefill: a PD decode server has none (the router adds the prefill's)
        self.prompt_lp = self.echo and bool(self.top) and not decode_only

    def echo_text(self, job: Job) -> str:
        return job.prompt.text if self.echo else ""

    def logprobs(self, job: Job, prev: int, k: int) -> dict | None:
        """Logprobs of output tokens prev..k (plus the prompt's with the first piece when echoing)."""
        if not self.lp:
            return None
        ids = job.ids[:k]
        top = self.top
        out_lps = output_logprobs(ids, prev, True)
        out_top = output_top_logprobs(ids, prev, top, True) if top else None
        if self.chat:
            return proto.chat_logprobs(out_lps, out_top, token_bytes, token_text)
        in_lps = in_top = None
        offsets = []
        base = len(self.echo_text(job))
        if prev == 0 and self.prompt_lp:
            in_lps = input_logprobs(job.prompt, True)
            in_top = input_top_logprobs(job.prompt, top, True) if top else None
            offsets = proto.char_offsets(job.prompt.key) if len(job.prompt.key) == job.prompt.n_tokens else [
                -1] * job.prompt.n_tokens
        out_bytes = bytes(t - OFFSET for t in ids)
        prior = len(_text_at(job, prev)) if prev else 0
        offsets += [base + prior + o for o in proto.char_offsets(out_bytes[prev:])]
        return proto.completion_logprobs(in_lps, in_top, out_lps, out_top, token_piece, offsets)

    def choice(self, index: int, job: Job) -> dict:
        lps = self.logprobs(job, 0, job.n_out)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": job.text, "reasoning_content": None,
                                                "tool_calls": None},
                    "logprobs": lps, "finish_reason": _finish(job), "matched_stop": job.finish_reason.get("matched")}
        return {"index": index, "text": self.echo_text(job) + job.text, "logprobs": lps,
                "finish_reason": _finish(job), "matched_stop": job.finish_reason.get("matched")}

    def usage(self) -> dict:
        return proto.usage([j.prompt.n_tokens for j in self.jobs], [j.n_out for j in self.jobs], self.n,
                           [j.cached for j in self.jobs])


class _Stream:
    """The SSE events of one streamed OpenAI response."""

    def __init__(self, view: _View, rid: str, model: str, created: int) -> None:
        self.view, self.jobs, self.chat = view, view.jobs, view.chat
        self.rid, self.model, self.created = rid, model, created
        self.obj = "chat.completion.chunk" if view.chat else "text_completion"
        self.include_usage = self.continuous = False
        self.sent = [0] * len(view.jobs)
        self.started = [False] * len(view.jobs)

    def options(self, body: dict) -> "_Stream":
        opts = body.get("stream_options") or {}
        if isinstance(opts, dict):
            self.include_usage = bool(opts.get("include_usage"))
            self.continuous = bool(opts.get("continuous_usage_stats"))
        return self

    def _event(self, choices: list, **extra) -> bytes:
        obj = {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model,
               "choices": choices, **extra}
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def head(self) -> bytes:
        """Chat streams announce the role first, as OpenAI and SGLang do."""
        if not self.chat:
            return b""
        return b"".join(self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]) for i in range(len(self.jobs)))

    def chunk(self, index: int, job: Job, k: int, final: bool) -> bytes:
        prev = self.sent[index]
        piece = _text_at(job, k)[len(_text_at(job, prev)):]
        if self.chat:
            ch = {"index": index, "delta": {"content": piece}, "logprobs": self.view.logprobs(job, prev, k)}
        else:
            if not self.started[index]:
                piece = self.view.echo_text(job) + piece
            ch = {"index": index, "text": piece, "logprobs": self.view.logprobs(job, prev, k)}
        self.started[index] = True
        ch["finish_reason"] = _finish(job) if final else None
        if final:
            ch["matched_stop"] = job.finish_reason.get("matched")
        self.sent[index] = k
        if self.continuous:
            p = job.prompt.n_tokens
            return self._event([ch], usage={"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k})
        return self._event([ch])

    def usage(self) -> bytes:
        return self._event([], usage=self.view.usage()) if self.include_usage else b""
