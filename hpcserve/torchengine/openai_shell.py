"""OpenAI-compatible /v1/completions and /v1/chat/completions on top of the torch engine's request runner.

One choice per request (n=1), one prompt per request; PD fields are read from the top level of the body
as a PD router adds them. Stream chunks carry the text of the new tokens (byte-level: a multi-byte
character split across steps shows as replacement characters in the deltas, not in the whole text).
"""

from __future__ import annotations

import os
import time

import orjson

from hpcserve.http import HttpConnection, Request
from hpcserve.mock.tokenizer import apply_chat_template, decode as detokenize
from hpcserve.torchengine.errors import RequestError, oai_error

DONE = b"data: [DONE]\n\n"


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
        try:
            body = orjson.loads(req.body)
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            if body.get("n") not in (None, 1):
                raise RequestError(400, "the torch engine supports n=1 only")
            mt = body.get("max_completion_tokens")
            sampling = {"max_new_tokens": body.get("max_tokens") if mt is None else mt,
                        "temperature": body.get("temperature"), "top_p": body.get("top_p"), "seed": body.get("seed"),
                        "stop_token_ids": body.get("stop_token_ids"), "ignore_eos": body.get("ignore_eos", False)}
            if chat:
                try:
                    text = apply_chat_template(body.get("messages"))
                except ValueError as err:
                    raise RequestError(400, str(err)) from None
                prompt, sp = srv.parse(body, text=text, sampling=sampling)
            else:
                p = body.get("prompt")
                if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
                    p = p[0]
                if isinstance(p, str):
                    prompt, sp = srv.parse(body, text=p, sampling=sampling)
                elif isinstance(p, list) and p and all(isinstance(i, int) for i in p):
                    prompt, sp = srv.parse(body, ids=p, sampling=sampling)
                else:
                    raise RequestError(400, "prompt must be a string or a list of token ids (one prompt per request)")
            srv.check_pd_fields(body)
        except orjson.JSONDecodeError as err:
            return self._fail(conn, RequestError(400, f"bad JSON: {err}"))
        except RequestError as err:
            return self._fail(conn, err)
        return self._run(conn, body, prompt, sp, chat)

    def _fail(self, conn: HttpConnection, err: RequestError) -> None:
        self.server.counts["errors"] += 1
        conn.respond(err.status, oai_error(err.status, err.message, err.kind))

    async def _run(self, conn: HttpConnection, body: dict, prompt: list[int], sp, chat: bool) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        model = body.get("model") or self.server.cfg.served_model_name
        obj = ("chat.completion" if chat else "text_completion")
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        stream = bool(body.get("stream"))
        sent = [0]

        def chunk(out: list[int], finish: str | None) -> bytes:
            delta = detokenize(out[sent[0]:])
            first = sent[0] == 0
            sent[0] = len(out)
            if chat:
                d = {"role": "assistant", "content": delta} if first else {"content": delta}
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + orjson.dumps({"id": rid, "object": chunk_obj, "created": created, "model": model,
                                             "choices": [choice]}) + b"\n\n"

        on_step = None
        if stream:
            conn.start_stream(200, b"text/event-stream", b"cache-control: no-cache\r\n")

            def on_step(seq) -> None:
                if not seq.finished:
                    conn.write(chunk(seq.out, None))
        try:
            out = await self.server.run(body, prompt, sp, on_step)
        except RequestError as err:
            self.server.counts["errors"] += 1
            if stream:
                conn.write(b"data: " + orjson.dumps({"error": {"message": err.message, "type": err.kind,
                                                               "code": err.status}}) + b"\n\n" + DONE)
                conn.end()
            else:
                conn.respond(err.status, oai_error(err.status, err.message, err.kind))
            return
        finish = "stop" if out and sp.stops(out[-1]) else "length"
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(out), "total_tokens": len(prompt) + len(out)}
        if stream:
            tail = [chunk(out, finish)]
            if (body.get("stream_options") or {}).get("include_usage"):
                tail.append(b"data: " + orjson.dumps({"id": rid, "object": chunk_obj, "created": created,
                                                      "model": model, "choices": [], "usage": usage}) + b"\n\n")
            conn.write(b"".join(tail) + DONE)
            conn.end()
            return
        text = detokenize(out)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        conn.respond(200, orjson.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                        "choices": [choice], "usage": usage}))
