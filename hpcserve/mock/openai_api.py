"""OpenAI-compatible endpoints of the mock: /v1/completions and /v1/chat/completions.

Shapes follow what the official ``openai`` client parses (and what SGLang returns): whole responses with
``usage``, streams of delta chunks ending in ``data: [DONE]``, a usage-only chunk when
``stream_options.include_usage`` is set, and SGLang's error object for bad requests. PD fields
(bootstrap_host/port/room) are read from the top level of the body, as a PD router adds them.
"""

from __future__ import annotations

import time

from typing import Any

import orjson

from hpcserve.http import HttpConnection, Request
from hpcserve.mock.engine import Boot, EngineError, Job, new_rid
from hpcserve.mock.model import SamplingParams, output_logprobs
from hpcserve.mock.server import DONE, SSE, SSE_HEADERS, oai_error, run_all
from hpcserve.mock.tokenizer import Prompt, apply_chat_template, token_text


def _finish(job: Job) -> str:
    return "stop" if job.finish_reason.get("type") == "stop" else "length"


def _text_at(job: Job, k: int) -> str:
    return job.text if k >= job.n_out else job.comp.text_upto(k)


class OpenAIApi:
    def __init__(self, server) -> None:
        self.server = server
        self.cfg = server.cfg
        self.engine = server.engine
        self.stats = server.stats

    def _sampling(self, body: dict) -> SamplingParams:
        mt = body.get("max_completion_tokens")
        if mt is None:
            mt = body.get("max_tokens")
        if body.get("n") not in (None, 1):
            raise ValueError("the mock engine supports n=1 only")
        d = {"max_new_tokens": mt, "temperature": body.get("temperature"), "top_p": body.get("top_p"),
             "seed": body.get("seed"), "stop": body.get("stop"), "stop_token_ids": body.get("stop_token_ids"),
             "min_new_tokens": body.get("min_tokens"), "ignore_eos": body.get("ignore_eos", False)}
        return SamplingParams.from_dict(d, self.cfg.default_max_tokens)

    def _jobs(self, body: dict, prompts: list[Prompt]) -> list[Job]:
        sp = self._sampling(body)
        host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
        n = len(prompts)
        jobs = []
        for i, prompt in enumerate(prompts):
            boot = None
            if (host, port, room) != (None, None, None):
                pick = (lambda v, i=i: v[i] if isinstance(v, list) and len(v) == n else v)
                boot = Boot(pick(host), pick(port), pick(room))
            jobs.append(self.engine.plan(prompt, sp, boot, None))
        return jobs

    def _serve(self, req: Request, conn: HttpConnection, endpoint: str, chat: bool):
        """Answer at once (None) or return the coroutine that answers, as MockServer.handle does."""
        stats = self.stats
        stats.count(endpoint)
        try:
            body = orjson.loads(req.body)
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            prompts = self._chat_prompts(body) if chat else self._completion_prompts(body)
            jobs = self._jobs(body, prompts)
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
        if body.get("stream"):
            sse = _Stream(body, jobs, chat, rid, model, created)
            if self.engine.is_instant(jobs):
                self._stream_now(conn, sse, jobs)
                return None
            return self._stream(conn, sse, jobs)
        if self.engine.is_instant(jobs):
            for job in jobs:
                self.engine.execute_now(job)
            self._respond(conn, body, jobs, chat, rid, model, created)
            return None
        return self._wait(conn, body, jobs, chat, rid, model, created)

    async def _wait(self, conn: HttpConnection, body: dict, jobs: list[Job], chat: bool, rid: str, model: str,
                    created: int) -> None:
        if await self.server.run_whole(conn, jobs, oai_error):
            self._respond(conn, body, jobs, chat, rid, model, created)

    def _respond(self, conn: HttpConnection, body: dict, jobs: list[Job], chat: bool, rid: str, model: str,
                 created: int) -> None:
        lp = body.get("logprobs")
        choices = [self._choice(job, i, chat, lp, body.get("echo")) for i, job in enumerate(jobs)]
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
               "model": model, "choices": choices, "usage": _usage(jobs)}
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

    # ---- response pieces
    def _choice(self, job: Job, index: int, chat: bool, lp: Any, echo: Any) -> dict:
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": job.text, "reasoning_content": None,
                                                "tool_calls": None},
                    "logprobs": _chat_logprobs(job.ids, 0, job.n_out) if lp else None,
                    "finish_reason": _finish(job), "matched_stop": job.finish_reason.get("matched")}
        text = (job.prompt.text + job.text) if echo else job.text
        return {"index": index, "text": text, "logprobs": _completion_logprobs(job.ids, 0, job.n_out) if lp else None,
                "finish_reason": _finish(job), "matched_stop": job.finish_reason.get("matched")}

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


class _Stream:
    """The SSE events of one streamed OpenAI response."""

    def __init__(self, body: dict, jobs: list[Job], chat: bool, rid: str, model: str, created: int) -> None:
        self.jobs, self.chat, self.rid, self.model, self.created = jobs, chat, rid, model, created
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        opts = body.get("stream_options") or {}
        self.include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        self.lp = body.get("logprobs")
        self.sent = [0] * len(jobs)

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
            ch = {"index": index, "delta": {"content": piece},
                  "logprobs": _chat_logprobs(job.ids, prev, k) if self.lp else None}
        else:
            ch = {"index": index, "text": piece,
                  "logprobs": _completion_logprobs(job.ids, prev, k) if self.lp else None}
        ch["finish_reason"] = _finish(job) if final else None
        if final:
            ch["matched_stop"] = job.finish_reason.get("matched")
        self.sent[index] = k
        return self._event([ch])

    def usage(self) -> bytes:
        return self._event([], usage=_usage(self.jobs)) if self.include_usage else b""


def _usage(jobs: list[Job]) -> dict:
    p = sum(j.prompt.n_tokens for j in jobs)
    c = sum(j.n_out for j in jobs)
    cached = sum(j.cached for j in jobs)  # reported once the KV cache saved something (kvcache.py)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached} if cached else None}


def _completion_logprobs(ids: list[int], start: int, end: int) -> dict:
    lps = output_logprobs(ids[:end], start, False)
    toks = [token_text(t) for _, t, _ in lps]
    offsets, pos = [], 0
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": toks, "token_logprobs": [lp for lp, _, _ in lps],
            "top_logprobs": [{t: lp} for t, (lp, _, _) in zip(toks, lps)], "text_offset": offsets}


def _chat_logprobs(ids: list[int], start: int, end: int) -> dict:
    lps = output_logprobs(ids[:end], start, False)
    return {"content": [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode()),
                         "top_logprobs": []} for lp, t, _ in lps]}
