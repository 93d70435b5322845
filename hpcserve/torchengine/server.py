"""SGLang-compatible HTTP API of the torch engine: /generate (aggregated, prefill, decode), info and health.

Model work goes through the iteration-level scheduler (scheduler.py); the event loop stays free for HTTP
and KV transfer. Streams get one event per step.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from urllib.parse import unquote

import orjson

from hpcserve.engine_shell.bootstrap import BootstrapTimeout
from hpcserve.engine_shell.errors import EngineError, error_body
from hpcserve.engine_shell.oai_protocol import model_card, model_not_found
from hpcserve.engine_shell.tokenizer import Prompt, decode as detokenize
from hpcserve.http import HttpConnection, Request
from hpcserve.torchengine import kvwire, logprobs
from hpcserve.torchengine.bootstrap import BinaryKVStore, KVFetcher
from hpcserve.torchengine.config import EngineConfig
from hpcserve.torchengine.model import TinyLlama
from hpcserve.torchengine.openai_shell import OpenAIShell
from hpcserve.torchengine.sampling import Sampling
from hpcserve.torchengine.scheduler import Scheduler, Seq

VERSION = "0.5.0-torch"
DONE = b"data: [DONE]\n\n"


# sampling_params this engine cannot honour, with the value that means "off": anything else is refused
NATIVE_OFF = {"stop": (None, "", []), "min_new_tokens": (None, 0), "n": (None, 1), "frequency_penalty": (None, 0),
              "presence_penalty": (None, 0), "repetition_penalty": (None, 1), "regex": (None,), "ebnf": (None,),
              "json_schema": (None,), "structural_tag": (None,)}


def refuse_unsupported(sp: object) -> None:
    if isinstance(sp, dict):
        for k, off in NATIVE_OFF.items():
            if sp.get(k) not in off:
                raise EngineError(400, f"sampling_params.{k} is not supported by the torch engine (see docs/api.md)")


def prompt_digest(ids: list[int]) -> str:
    return hashlib.sha256(orjson.dumps(ids)).hexdigest()[:32]


class TorchServer:
    def __init__(self, cfg: EngineConfig, model: TinyLlama) -> None:
        self.cfg, self.model = cfg, model
        self.scheduler = Scheduler(model, cfg.max_running)
        self.store = BinaryKVStore()
        self.fetcher = KVFetcher()
        self.created = int(time.time())
        self.running = 0
        self.counts = {"requests": 0, "errors": 0, "kv_bytes_sent": 0, "kv_bytes_received": 0}
        oa = OpenAIShell(self)
        self.routes = {b"/generate": self.generate, b"/health": self.health, b"/health_generate": self.health,
                       b"/ping": self.health, b"/v1/models": self.models, b"/model_info": self.model_info,
                       b"/get_model_info": self.model_info, b"/server_info": self.server_info,
                       b"/get_server_info": self.server_info, b"/flush_cache": self.flush_cache,
                       b"/torch/stats": self.stats, b"/v1/completions": oa.completions,
                       b"/v1/chat/completions": oa.chat}

    def handle(self, req: Request, conn: HttpConnection):
        route = self.routes.get(req.path)
        if route is None and req.path.startswith(b"/v1/models/"):
            route = self.model_card
        if route is None:
            conn.respond(404, error_body(404, f"no route {req.path.decode('latin-1')} on the torch engine", "NotFound"))
            return None
        return route(req, conn)

    # ---- /generate
    def parse(self, body: dict, text=None, ids=None, sampling: dict | None = None) -> tuple[list[int], Sampling]:
        """Prompt and sampling of a native body (or of the given text/ids/sampling from an OpenAI body)."""
        if text is None and ids is None:
            text, ids = body.get("text"), body.get("input_ids")
        if text is not None:
            if not isinstance(text, str):
                raise EngineError(400, "text must be a string")
            prompt = Prompt.from_text(text).ids
        elif ids is not None:
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise EngineError(400, "input_ids must be a list of integers")
            prompt = list(ids)
        else:
            raise EngineError(400, "the request needs text or input_ids")
        vocab = self.model.cfg.vocab_size
        if not prompt or not all(0 <= i < vocab for i in prompt):
            raise EngineError(400, f"the prompt must have at least one token, every id in [0, {vocab})")
        if len(prompt) >= self.cfg.context_length:
            raise EngineError(400, f"the prompt has {len(prompt)} tokens; the context length is {self.cfg.context_length}")
        if sampling is None:
            refuse_unsupported(body.get("sampling_params"))
        try:
            sp = Sampling.from_dict(body.get("sampling_params") if sampling is None else sampling,
                                    self.cfg.default_max_tokens, random.getrandbits(62))
        except (ValueError, TypeError) as err:
            raise EngineError(400, str(err)) from None
        return prompt, sp

    def generate(self, req: Request, conn: HttpConnection):
        self.counts["requests"] += 1
        try:
            body = orjson.loads(req.body)
            if not isinstance(body, dict):
                raise EngineError(400, "the request body must be a JSON object")
            text, ids = body.get("text"), body.get("input_ids")
            if isinstance(text, list) or (isinstance(ids, list) and ids and isinstance(ids[0], list)):
                return self._generate_batch(conn, self._batch_items(body))
            prompt, sp = self.parse(body)
            self.check_pd_fields(body)
        except orjson.JSONDecodeError as err:
            return self._fail(conn, EngineError(400, f"bad JSON: {err}"))
        except EngineError as err:
            return self._fail(conn, err)
        return self._generate(conn, body, prompt, sp)

    def native_lp(self, body: dict) -> tuple[int, int, bool] | None:
        """(top_logprobs_num, logprob_start_len, return_text_in_logprobs) of a /generate body, or None."""
        if not body.get("return_logprob"):
            return None
        top, start = body.get("top_logprobs_num") or 0, body.get("logprob_start_len")
        start = -1 if start is None else start
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (top, start)) or top < 0:
            raise EngineError(400, "top_logprobs_num and logprob_start_len must be integers")
        return top, start, bool(body.get("return_text_in_logprobs"))

    @staticmethod
    def seq_lp(lp: tuple[int, int, bool] | None) -> tuple[int, bool] | None:
        return None if lp is None else (lp[0], lp[1] >= 0)

    def _batch_items(self, body: dict) -> list[tuple[dict, list[int], Sampling]]:
        """A batch /generate as one body per item: list-valued fields give one entry per item."""
        text, ids = body.get("text"), body.get("input_ids")
        prompts = [("text", t) for t in text] if isinstance(text, list) else [("input_ids", x) for x in ids]
        n = len(prompts)
        if n == 0:
            raise EngineError(400, "empty batch")
        items = []
        for i, (key, value) in enumerate(prompts):
            item = {k: v for k, v in body.items() if k not in ("text", "input_ids")}
            for k in ("sampling_params", "rid", "bootstrap_host", "bootstrap_port", "bootstrap_room"):
                v = body.get(k)
                if isinstance(v, list):
                    if len(v) != n:
                        raise EngineError(400, f"{k} has {len(v)} entries for a batch of {n}")
                    item[k] = v[i]
            item[key] = value
            prompt, sp = self.parse(item)
            self.check_pd_fields(item)
            items.append((item, prompt, sp))
        return items

    async def _generate_batch(self, conn: HttpConnection, items: list) -> None:
        """Items run concurrently (they interleave in the scheduler); the answer is a list in order."""
        t0 = time.perf_counter()
        rids = [item.get("rid") or os.urandom(16).hex() for item, _, _ in items]
        stream = bool(items[0][0].get("stream"))
        try:
            lps = [self.native_lp(item) for item, _, _ in items]
        except EngineError as err:
            self._fail(conn, err)
            return

        def stepper(i: int):
            def on_step(seq: Seq) -> None:
                if not seq.finished:
                    conn.write(self._event({**self._result(rids[i], seq, False, t0, lps[i]), "index": i}))
            return on_step
        if stream:
            conn.start_stream(200, b"text/event-stream", b"cache-control: no-cache\r\n")
        outs = await asyncio.gather(*(self.run(item, prompt, sp, stepper(i) if stream else None, self.seq_lp(lps[i]))
                                      for i, (item, prompt, sp) in enumerate(items)), return_exceptions=True)
        err = next((o for o in outs if isinstance(o, BaseException)), None)
        if err is not None:
            if not isinstance(err, EngineError):
                raise err
            self._answer_error(conn, err, stream)
            return
        results = [self._result(rids[i], outs[i], True, t0, lps[i]) for i in range(len(items))]
        if stream:
            conn.write(b"".join(self._event({**r, "index": i}) for i, r in enumerate(results)) + DONE)
            conn.end()
        else:
            conn.respond(200, orjson.dumps(results))

    def _fail(self, conn: HttpConnection, err: EngineError) -> None:
        self.counts["errors"] += 1
        conn.respond(err.status, error_body(err.status, err.message, err.kind))

    def _answer_error(self, conn: HttpConnection, err: EngineError, stream: bool) -> None:
        """A started stream ends with an SSE error event; otherwise a JSON error response."""
        if not stream:
            self._fail(conn, err)
            return
        self.counts["errors"] += 1
        conn.write(self._event(orjson.loads(error_body(err.status, err.message, err.kind))) + DONE)
        conn.end()

    async def run(self, body: dict, prompt: list[int], sp: Sampling, on_step=None, lp: tuple | None = None) -> Seq:
        """The finished sequence of one request in this server's role (``out``, and with ``lp`` = (top,
        prompt_lp) its log-probability rows); raises EngineError."""
        self.running += 1
        top, prompt_lp = lp if lp is not None else (None, False)
        try:
            if self.cfg.mode == "prefill":
                return await self._prefill(body, prompt, sp, top, prompt_lp)
            if self.cfg.mode == "decode":
                return await self._decode(body, prompt, sp, on_step, top)
            seq = Seq(prompt, sp, on_step=on_step, top=top, prompt_lp=prompt_lp)
            if sp.max_new_tokens == 0:
                return seq
            return await self.scheduler.submit(seq)
        except ValueError as err:      # the model refused (sequence longer than its context)
            raise EngineError(400, str(err)) from None
        finally:
            self.running -= 1

    async def _generate(self, conn: HttpConnection, body: dict, prompt: list[int], sp: Sampling) -> None:
        t0 = time.perf_counter()
        rid = body.get("rid") or os.urandom(16).hex()
        stream = bool(body.get("stream"))
        try:
            lp = self.native_lp(body)
        except EngineError as err:
            self._fail(conn, err)
            return
        on_step = None
        if stream:
            conn.start_stream(200, b"text/event-stream", b"cache-control: no-cache\r\n")

            def on_step(seq: Seq) -> None:
                if not seq.finished:
                    conn.write(self._event(self._result(rid, seq, False, t0, lp)))
        try:
            seq = await self.run(body, prompt, sp, on_step, self.seq_lp(lp))
        except EngineError as err:
            self._answer_error(conn, err, stream)
            return
        result = self._result(rid, seq, True, t0, lp)
        if stream:
            conn.write(self._event(result) + DONE)
            conn.end()
        else:
            conn.respond(200, orjson.dumps(result))

    @staticmethod
    def _event(obj: dict) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _result(self, rid: str, seq: Seq, final: bool, t0: float, lp: tuple | None = None) -> dict:
        prompt, sp, out = seq.prompt, seq.sp, seq.out
        finish = None
        if final:
            finish = ({"type": "stop", "matched": out[-1]} if out and sp.stops(out[-1])
                      else {"type": "length", "length": len(out)})
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt), "completion_tokens": len(out),
                "cached_tokens": 0, "e2e_latency": round(time.perf_counter() - t0, 6)}
        if lp is not None:
            meta.update(logprobs.native_meta(prompt, seq.in_rows, out, seq.out_rows[:len(out)], lp[0], lp[1], lp[2]))
        return {"text": detokenize(out), "output_ids": list(out), "meta_info": meta}

    def check_pd_fields(self, body: dict) -> None:
        """Before anything is sent: a PD server needs the router's bootstrap fields."""
        if self.cfg.mode == "null":
            return
        room = body.get("bootstrap_room")
        if not isinstance(room, int) or isinstance(room, bool):
            raise EngineError(400, "a PD request needs an integer bootstrap_room (send it through the router)")
        if self.cfg.mode == "decode":
            host, port = body.get("bootstrap_host"), body.get("bootstrap_port")
            if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
                raise EngineError(400, "a decode request needs bootstrap_host and an integer bootstrap_port "
                                        "(the prefill's bootstrap port; it is never defaulted)")

    async def _prefill(self, body: dict, prompt: list[int], sp: Sampling, top: int | None, prompt_lp: bool) -> Seq:
        room = body["bootstrap_room"]
        seq = await self.scheduler.submit(Seq(prompt, sp, prefill_only=True, top=top, prompt_lp=prompt_lp))
        first = seq.out[0]
        meta = {"prompt_len": len(prompt), "prompt_digest": prompt_digest(prompt), "first_token": first,
                "sampling": sp.to_dict()}
        if seq.out_rows:  # the decode reports the first token's log-probabilities as one process would
            meta["first_row"] = logprobs.to_json(seq.out_rows[0])
        payload = kvwire.pack(seq.cache, meta)
        try:
            r = self.store.put_bytes(room, payload)
        except ValueError as err:
            raise EngineError(400, str(err)) from None
        if not await self.store.wait_fetched(room, r, self.cfg.bootstrap_timeout):
            raise EngineError(500, f"bootstrap timeout: no decode server fetched the KV of bootstrap_room {room}",
                               "InternalServerError")
        self.counts["kv_bytes_sent"] += len(payload)
        if not sp.max_new_tokens:
            seq.out, seq.out_rows = [], []
        return seq

    async def _decode(self, body: dict, prompt: list[int], sp: Sampling, on_step, top: int | None) -> Seq:
        host, port, room = body["bootstrap_host"], body["bootstrap_port"], body["bootstrap_room"]
        try:
            data = await self.fetcher.fetch(host, port, room, self.cfg.bootstrap_timeout)
            cache, meta = kvwire.unpack(data)
        except BootstrapTimeout as err:
            raise EngineError(500, str(err), "InternalServerError") from None
        except kvwire.WireError as err:
            raise EngineError(500, f"KV of bootstrap_room {room}: {err}", "InternalServerError") from None
        self.counts["kv_bytes_received"] += len(data)
        if meta["prompt_len"] != len(prompt) or meta["prompt_digest"] != prompt_digest(prompt):
            raise EngineError(500, f"KV mismatch: bootstrap_room {room} holds the KV of another prompt",
                               "InternalServerError")
        m = self.model.cfg
        if len(cache) != m.n_layers or tuple(cache[0][0].shape) != (m.n_kv_heads, len(prompt), m.head_dim):
            raise EngineError(500, f"KV mismatch: the prefill runs another model (KV shape {list(cache[0][0].shape)})",
                               "InternalServerError")
        if sp.max_new_tokens == 0:
            return Seq(prompt, sp, top=top)
        # a request without a seed gets the one the prefill drew, so both halves sample one sequence
        given = body.get("sampling_params") or {}
        explicit = "seed" in given or "sampling_seed" in given or body.get("seed") is not None
        seed = sp.seed if explicit else meta["sampling"]["seed"]
        sp = Sampling(sp.max_new_tokens, sp.temperature, sp.top_p, seed, sp.stop_token_ids, sp.ignore_eos)
        first_row = logprobs.from_json(meta["first_row"]) if top is not None and "first_row" in meta else None
        seq = Seq(prompt, sp, first=meta["first_token"], cache=cache, on_step=on_step, top=top, first_row=first_row)
        if on_step is not None and not seq.finished:
            on_step(seq)      # the prefill's token is this stream's first event
        return await self.scheduler.submit(seq)

    # ---- info, health
    def health(self, req: Request, conn: HttpConnection) -> None:
        conn.respond(200, b"", b"text/plain")

    def models(self, req: Request, conn: HttpConnection) -> None:
        name = self.cfg.served_model_name
        conn.respond(200, orjson.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "sglang", "root": name,
             "parent": None, "max_model_len": self.cfg.context_length}]}))

    def model_card(self, req: Request, conn: HttpConnection) -> None:
        """GET /v1/models/{id}: SGLang's ModelCard, or its 404 for another name."""
        name = unquote(req.path[len(b"/v1/models/"):].decode("latin-1"))
        if name != self.cfg.served_model_name:
            conn.respond(404, orjson.dumps(model_not_found(name)))
            return
        conn.respond(200, orjson.dumps(model_card(name, self.created, self.cfg.context_length)))

    def model_info(self, req: Request, conn: HttpConnection) -> None:
        conn.respond(200, orjson.dumps({
            "model_path": self.cfg.model_path, "tokenizer_path": self.cfg.model_path, "is_generation": True,
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "served_model_name": self.cfg.served_model_name,
            "vocab_size": self.model.cfg.vocab_size, "context_length": self.cfg.context_length,
            "torch_model": self.model.cfg.describe()}))

    def server_info(self, req: Request, conn: HttpConnection) -> None:
        cfg = self.cfg
        conn.respond(200, orjson.dumps({
            **cfg.server_args(), "version": VERSION, "engine": "torch", "argv": cfg.argv, "extra_args": cfg.extra_args,
            "pid": os.getpid(), "torch_model": self.model.cfg.describe(), "scheduling": "iteration-level, unbatched",
            "max_running_requests": cfg.max_running, "iterations": self.scheduler.iterations,
            "bootstrap_port": cfg.bootstrap_port if cfg.mode == "prefill" else None,
            "internal_states": [{"last_gen_throughput": 0.0, "avg_spec_accept_length": None}]}))

    def flush_cache(self, req: Request, conn: HttpConnection) -> None:
        conn.respond(200, b"Cache flushed.\n", b"text/plain")

    def stats(self, req: Request, conn: HttpConnection) -> None:
        conn.respond(200, orjson.dumps({**self.counts, "running": self.running, "iterations": self.scheduler.iterations,
                                        "waiting": len(self.scheduler.waiting)}))

    def close(self) -> None:
        self.fetcher.close()
