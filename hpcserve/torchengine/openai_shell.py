"""OpenAI-compatible /v1/completions and /v1/chat/completions on top of the torch engine's request runner.

Requests are checked by the mock's SGLang 0.5.23 rules (oai_protocol.py: same refusals, same error bodies).
Served: one or more prompts, ``n`` samples each (one sequence per choice, PD rooms counted up as SGLang
does), ``logprobs``/``top_logprobs`` from the real logits, ``echo`` with the prompt's log-probabilities (the
prefill's in PD: the router merges them), ``stream_options.include_usage``. Parameters this engine cannot
honour (stop strings, min_tokens, penalties, logit_bias) are refused, never ignored. Stream chunks carry the
text of the new tokens (byte-level: a character split across steps shows as replacement characters there).
"""

from __future__ import annotations

import asyncio
import os
import time

import orjson

from hpcserve.engine_shell import oai_protocol as proto
from hpcserve.engine_shell.errors import EngineError, oai_error
from hpcserve.engine_shell.tokenizer import OFFSET, apply_chat_template, decode as detokenize, token_bytes, token_piece, \
    token_text
from hpcserve.http import HttpConnection, Request

DONE = b"data: [DONE]\n\n"
SSE_HEAD = b"cache-control: no-cache\r\n"
# parameters this engine cannot honour, with the values that mean "off": anything else is refused
UNSUPPORTED = {"stop": (None, "", []), "min_tokens": (None, 0), "logit_bias": (None, {}),
               "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "repetition_penalty": (None, 1)}


def token_offsets(ids: list[int], base: int) -> list[int]:
    """Character offset of each byte-token in the decoded text (a continuation byte points at its character)."""
    out, chars = [], 0
    for t in ids:
        if not OFFSET <= t < OFFSET + 256:
            out.append(base + chars)
            continue
        cont = ((t - OFFSET) & 0xC0) == 0x80
        out.append(base + (chars - 1 if cont and chars else chars))
        if not cont:
            chars += 1
    return out


def _unsupported(body: dict) -> None:
    for k, off in UNSUPPORTED.items():
        if body.get(k) not in off:
            raise proto.ApiError(f"{k} is not supported by the torch engine (see docs/api.md)")
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("continuous_usage_stats"):
        raise proto.ApiError("stream_options.continuous_usage_stats is not supported by the torch engine")


class _Choices:
    """The choices of one request: their sequences and how their text and log-probabilities look."""

    def __init__(self, body: dict, chat: bool, prompts: list[list[int]], n: int) -> None:
        self.chat, self.prompts, self.n = chat, prompts, n
        if chat:
            self.lp, self.echo = bool(body.get("logprobs")), False
            self.top = (body.get("top_logprobs") or 0) if self.lp else 0
        else:
            self.lp, self.echo = body.get("logprobs") is not None, bool(body.get("echo"))
            self.top = body.get("logprobs") or 0
        self.prompt_lp = self.echo and bool(self.top)  # SGLang: echo and a truthy logprobs
        self.seqs: list = [None] * (len(prompts) * n)
        self.sent = [0] * len(self.seqs)

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    def echo_text(self, index: int) -> str:
        return detokenize(self.prompt_of(index)) if self.echo else ""

    def logprobs(self, index: int, seq, prev: int, k: int) -> dict | None:
        if not self.lp:
            return None
        rows, out = seq.out_rows[prev:k], seq.out[prev:k]
        out_lps = [[r[0], t, None] for r, t in zip(rows, out)]
        out_top = [[[v, t, None] for v, t in r[1]] for r in rows] if self.top else None
        if self.chat:
            return proto.chat_logprobs(out_lps, out_top, token_bytes, token_text)
        in_lps = in_top = None
        offsets: list[int] = []
        prompt = self.prompt_of(index)
        if prev == 0 and self.prompt_lp and seq.in_rows is not None:
            in_lps = [[None, prompt[0], None]] + [[r[0], t, None] for r, t in zip(seq.in_rows, prompt[1:])]
            in_top = [None] + [[[v, t, None] for v, t in r[1]] for r in seq.in_rows] if self.top else None
            offsets = token_offsets(prompt, 0)
        offsets += token_offsets(seq.out[:k], len(self.echo_text(index)))[prev:]
        return proto.completion_logprobs(in_lps, in_top, out_lps, out_top, token_piece, offsets)

    def finish(self, seq) -> tuple[str, int | None]:
        out = seq.out
        return ("stop", out[-1]) if out and seq.sp.stops(out[-1]) else ("length", None)

    def choice(self, index: int, seq) -> dict:
        reason, matched = self.finish(seq)
        lps = self.logprobs(index, seq, 0, len(seq.out))
        text = detokenize(seq.out)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                    "finish_reason": reason, "matched_stop": matched}
        return {"index": index, "text": self.echo_text(index) + text, "logprobs": lps, "finish_reason": reason,
                "matched_stop": matched}

    def delta(self, index: int, seq, final: bool) -> dict:
        prev, k = self.sent[index], len(seq.out)
        piece = detokenize(seq.out[prev:k])
        lps = self.logprobs(index, seq, prev, k)
        if self.chat:
            ch = {"index": index, "delta": {"content": piece}, "logprobs": lps}
        else:
            ch = {"index": index, "text": (self.echo_text(index) if prev == 0 else "") + piece, "logprobs": lps}
        self.sent[index] = k
        ch["finish_reason"] = self.finish(seq)[0] if final else None
        return ch

    def usage(self) -> dict:
        return proto.usage([len(s.prompt) for s in self.seqs], [len(s.out) for s in self.seqs], self.n)


class OpenAIShell:
    def __init__(self, server) -> None:
        self.server = server

    def completions(self, req: Request, conn: HttpConnection):
        return self._serve(req, conn, chat=False)

    def chat(self, req: Request, conn: HttpConnection):
        return self._serve(req, conn, chat=True)

    def _serve(self, req: Request, conn: HttpConnection, chat: bool):
        srv = self.server
        srv.counts["requests"] += 1
        served = srv.cfg.served_model_name
        try:
            body = orjson.loads(req.body)
            if not isinstance(body, dict):
                raise proto.ApiError("the request body must be a JSON object", "Bad Request")
            if chat:
                proto.check_chat(body, served)
            else:
                proto.check_completion(body, served)
            _unsupported(body)
            items, view = self._plan(body, chat)
        except orjson.JSONDecodeError as err:
            return self._fail(conn, EngineError(400, f"bad JSON: {err}"))
        except proto.ApiError as err:
            return self._fail(conn, EngineError(err.status, err.message, err.kind))
        except EngineError as err:
            return self._fail(conn, err)
        return self._run(conn, body, items, view)

    def _prompts(self, body: dict, chat: bool) -> list[tuple[str | None, list[int] | None]]:
        if chat:
            try:
                return [(apply_chat_template(body.get("messages"), bool(body.get("add_generation_prompt", True))),
                         None)]
            except ValueError as err:
                raise EngineError(400, str(err)) from None
        p = body.get("prompt")
        if isinstance(p, str):
            return [(p, None)]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return [(x, None) for x in p]
            if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                return [(None, p)]
            if all(isinstance(x, list) for x in p):
                return [(None, x) for x in p]
        raise EngineError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those")

    def _plan(self, body: dict, chat: bool) -> tuple[list, _Choices]:
        srv = self.server
        n = body.get("n") or 1
        room = body.get("bootstrap_room")
        prompts = self._prompts(body, chat)
        items, ids = [], []
        for i, (text, pids) in enumerate(prompts):
            for j in range(n):
                item = dict(body)
                np_ = len(prompts)
                for k in ("bootstrap_host", "bootstrap_port"):  # a batch router sends one per prompt
                    if isinstance(body.get(k), list) and len(body[k]) == np_:
                        item[k] = body[k][i]
                if isinstance(room, list) and len(room) == np_ and isinstance(room[i], int):
                    item["bootstrap_room"] = room[i] + j * np_  # SGLang's rooms of the samples of prompt i
                elif isinstance(room, int) and not isinstance(room, bool):  # one room counts up over all items
                    item["bootstrap_room"] = room + i * n + j
                sampling = {"temperature": body.get("temperature"), "top_p": body.get("top_p"),
                            "seed": body.get("seed"), "stop_token_ids": body.get("stop_token_ids"),
                            "ignore_eos": body.get("ignore_eos", False), "max_new_tokens": 0}
                prompt, _ = srv.parse(item, text=text, ids=pids, sampling=sampling)
                if chat:  # no default cap: what is left of the context (SGLang leaves max_new_tokens unset)
                    mt = proto.chat_max_tokens(body)
                    sampling["max_new_tokens"] = srv.cfg.context_length - len(prompt) if mt is None else mt
                else:
                    sampling["max_new_tokens"] = body.get("max_tokens", proto.COMPLETION_DEFAULT_MAX_TOKENS)
                prompt, sp = srv.parse(item, ids=prompt, sampling=sampling)
                srv.check_pd_fields(item)
                items.append((item, prompt, sp))
            ids.append(items[-1][1])
        return items, _Choices(body, chat, ids, n)

    def _fail(self, conn: HttpConnection, err: EngineError) -> None:
        self.server.counts["errors"] += 1
        conn.respond(err.status, oai_error(err.status, err.message, err.kind))

    async def _run(self, conn: HttpConnection, body: dict, items: list, view: _Choices) -> None:
        srv = self.server
        chat = view.chat
        rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        model = body.get("model") or srv.cfg.served_model_name
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        stream = bool(body.get("stream"))
        lp = (view.top, view.prompt_lp and srv.cfg.mode != "decode") if view.lp else None

        def event(choices: list, **extra) -> bytes:
            return b"data: " + orjson.dumps({"id": rid, "object": chunk_obj, "created": created, "model": model,
                                             "choices": choices, **extra}) + b"\n\n"

        def stepper(index: int):
            def on_step(seq) -> None:
                if not seq.finished:
                    conn.write(event([view.delta(index, seq, False)]))
            return on_step if stream else None

        if stream:
            conn.start_stream(200, b"text/event-stream", SSE_HEAD)
            if chat:  # chat streams announce the role first, as OpenAI and SGLang do
                conn.write(b"".join(event([{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]) for i in range(len(items))))
        outs = await asyncio.gather(*(srv.run(item, prompt, sp, stepper(i), lp)
                                      for i, (item, prompt, sp) in enumerate(items)), return_exceptions=True)
        err = next((o for o in outs if isinstance(o, BaseException)), None)
        if err is not None:
            if not isinstance(err, EngineError):
                raise err
            srv.counts["errors"] += 1
            if stream:
                conn.write(b"data: " + orjson.dumps({"error": orjson.loads(oai_error(err.status, err.message,
                                                                                     err.kind))}) + b"\n\n" + DONE)
                conn.end()
            else:
                conn.respond(err.status, oai_error(err.status, err.message, err.kind))
            return
        view.seqs = list(outs)
        if stream:
            tail = [event([view.delta(i, seq, True)]) for i, seq in enumerate(outs)]
            if (body.get("stream_options") or {}).get("include_usage"):
                tail.append(event([], usage=view.usage()))
            conn.write(b"".join(tail) + DONE)
            conn.end()
            return
        conn.respond(200, orjson.dumps({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                        "created": created, "model": model,
                                        "choices": [view.choice(i, s) for i, s in enumerate(outs)],
                                        "usage": view.usage()}))
