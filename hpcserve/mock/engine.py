"""One generation through the mock engine, by role: aggregated (null), PD prefill or PD decode.

``Engine.plan`` validates an item and decides its output (pure, synchronous); ``Engine.execute`` spends
the modelled time, does the PD rendezvous and reports progress token by token for streaming.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Awaitable, Callable

from hpcserve.engine_shell.bootstrap import BootstrapTimeout, KVClient, KVStore
from hpcserve.engine_shell.errors import EngineError
from hpcserve.engine_shell.tokenizer import Prompt
from hpcserve.mock.kv_events import make_publisher
from hpcserve.mock.kvcache import make_kvcache
from hpcserve.mock.model import SamplingParams, complete, decode_step_ms, kv_digest, prefill_ms
from hpcserve.mock.scheduler import Scheduler, Seq


class Boot:
    """The PD fields of one request item, as received (any may be None)."""

    __slots__ = ("host", "port", "room")

    def __init__(self, host: Any, port: Any, room: Any) -> None:
        self.host, self.port, self.room = host, port, room

    @property
    def given(self) -> bool:
        return self.host is not None or self.port is not None or self.room is not None


class Job:
    """A planned item: what this server will emit, plus the timing and latency once executed."""

    __slots__ = ("prompt", "sp", "boot", "rid", "comp", "ids", "text", "finish_reason", "timing", "e2e",
                 "t0", "first", "cached", "lease")

    def __init__(self, prompt: Prompt, sp: SamplingParams, boot: Boot | None, rid: str | None) -> None:
        self.prompt = prompt
        self.sp = sp
        self.boot = boot
        self.rid = rid or new_rid()
        self.timing: dict | None = None
        self.e2e = 0.0
        self.t0 = time.perf_counter()
        self.cached = 0     # prompt tokens found in the KV cache
        self.lease = None   # the KV cache blocks held while it runs

    @property
    def n_out(self) -> int:
        return len(self.ids)


_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count()


def new_rid() -> str:
    """A request id unique to this process and run (32 hex digits, like SGLang's uuid hex)."""
    return "%s%016x" % (_RID_PREFIX, next(_rid_counter))


OnTokens = Callable[[int], Awaitable[None]]


class Engine:
    def __init__(self, cfg, stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self.mode = cfg.disaggregation_mode
        self.scheduler = Scheduler(cfg) if cfg.time_scale > 0 else None
        self.store = KVStore(stats) if self.mode == "prefill" else None
        self.kv = KVClient() if self.mode == "decode" else None
        self.kvcache = make_kvcache(cfg)
        self.kv_events = make_publisher(cfg.extra_args, self.kvcache.block_size) if self.kvcache else None
        if self.kv_events is not None:
            self.kvcache.publish = self.kv_events.publish

    def start(self) -> None:
        if self.scheduler is not None:
            self.scheduler.start()

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.kv is not None:
            self.kv.close()
        if self.kv_events is not None:
            self.kv_events.close()

    @property
    def running(self) -> int:
        return self.scheduler.num_running if self.scheduler is not None else self.stats.inflight

    @property
    def queued(self) -> int:
        return self.scheduler.num_waiting if self.scheduler is not None else 0

    def plan(self, prompt: Prompt, sp: SamplingParams, boot: Boot | None, rid: str | None) -> Job:
        if self.mode == "decode":
            _check_decode_boot(boot, self.stats)
        elif self.mode == "prefill" and boot is not None and boot.room is not None:
            if not isinstance(boot.room, int) or isinstance(boot.room, bool):
                raise EngineError(400, f"bootstrap_room {boot.room!r} must be an integer")
        if sp.max_new_tokens + prompt.n_tokens > self.cfg.context_length:
            raise EngineError(400, f"the prompt ({prompt.n_tokens} tokens) plus max_new_tokens "
                                   f"({sp.max_new_tokens}) exceeds the context length {self.cfg.context_length}")
        job = Job(prompt, sp, boot, rid)
        comp = complete(prompt, sp)
        job.comp = comp
        job.first = comp.ids[0] if comp.ids else -1
        if self.mode == "prefill":  # the prefill emits the first token; the decode emits them all
            job.ids = comp.ids[:1]
            job.text = comp.text_upto(1)
            job.finish_reason = comp.finish_reason if comp.n_out <= 1 else {"type": "length", "length": 1}
        else:
            job.ids, job.text, job.finish_reason = comp.ids, comp.text, comp.finish_reason
        return job

    def is_instant(self, jobs: list[Job]) -> bool:
        """True when the jobs need no waiting at all (time scale 0, no PD rendezvous): answer synchronously."""
        if self.scheduler is not None:
            return False
        if self.mode == "null":
            return True
        return self.mode == "prefill" and all(j.boot is None or j.boot.room is None for j in jobs)

    def execute_now(self, job: Job) -> Job:
        """``execute`` for an instant job (see ``is_instant``), without a coroutine."""
        self._admit(job)
        job.timing = self._model_timing(job)
        return self._finish(job)

    async def execute(self, job: Job, on_tokens: OnTokens | None = None) -> Job:
        cfg, mode = self.cfg, self.mode
        n_out = job.n_out
        if mode == "decode":
            await self._fetch_kv(job)
        needs_prefill = mode != "decode"
        steps = max(n_out, 1) if needs_prefill else n_out
        self._admit(job)
        if self.scheduler is not None and steps > 0:
            sched = self.scheduler
            seq = Seq(job.prompt.n_tokens - job.cached, steps, needs_prefill)
            sched.submit(seq)
            try:
                while seq.emitted < steps:
                    k = await sched.progress(seq)
                    if on_tokens is not None and k <= n_out:
                        await on_tokens(k)
            finally:
                if seq.emitted < steps:
                    sched.cancel(seq)
                    self._release(job, job.prompt.ids)
            job.timing = seq.timing(cfg.time_scale)
        else:
            job.timing = self._model_timing(job)
            if on_tokens is not None:
                for k in range(1, n_out + 1):
                    await on_tokens(k)
        if mode == "prefill" and job.boot is not None and job.boot.room is not None:
            try:
                await self._hand_over_kv(job)
            except BaseException:
                self._release(job, job.prompt.ids)
                raise
        return self._finish(job)

    def _model_timing(self, job: Job) -> dict:
        """Model times of one sequence running alone (what the scheduler reports at concurrency 1)."""
        cfg = self.cfg
        needs_prefill = self.mode != "decode"
        decode_steps = max(job.n_out - 1, 0)
        prefill = prefill_ms(cfg, job.prompt.n_tokens - job.cached) if needs_prefill else 0.0
        return {"queue_ms": 0.0, "prefill_ms": prefill,
                "decode_ms": decode_steps * decode_step_ms(cfg, 1), "decode_steps": decode_steps,
                "time_scale": cfg.time_scale}

    def _admit(self, job: Job) -> None:
        """Look the prompt up in the KV cache: only uncached tokens are prefilled (kvcache.py)."""
        if self.kvcache is not None and self.mode != "decode":
            job.lease = self.kvcache.start(job.prompt.ids)
            job.cached = job.lease.cached_tokens

    def _release(self, job: Job, ids: list[int]) -> None:
        if job.lease is not None:
            self.kvcache.finish(job.lease, ids)
            job.lease = None

    def flush_cache(self) -> None:
        if self.kvcache is not None:
            self.kvcache.flush()

    def _finish(self, job: Job) -> Job:
        self._release(job, job.prompt.ids + job.ids)
        self.stats.prompt_tokens += job.prompt.n_tokens
        self.stats.generation_tokens += job.n_out
        job.e2e = time.perf_counter() - job.t0
        return job

    async def _fetch_kv(self, job: Job) -> None:
        b = job.boot
        try:
            kv = await self.kv.fetch(b.host, b.port, b.room, self.cfg.bootstrap_timeout)
        except BootstrapTimeout as err:
            self.stats.bootstrap_timeouts += 1
            raise EngineError(500, str(err), "BootstrapTimeout") from None
        expect = kv_digest(job.prompt, job.first)
        if kv.get("kv") != expect:
            self.stats.kv_mismatches += 1
            raise EngineError(500, f"KV mismatch for bootstrap_room {b.room}: the prefill at {b.host}:{b.port} "
                                   f"computed it for another prompt or other sampling parameters (prefill saw "
                                   f"{kv.get('prompt_tokens')} prompt tokens, this decode {job.prompt.n_tokens})",
                              "KVMismatch")
        self.stats.rooms_bootstrapped += 1

    async def _hand_over_kv(self, job: Job) -> None:
        room = job.boot.room
        payload = {"room": room, "kv": kv_digest(job.prompt, job.first), "prompt_tokens": job.prompt.n_tokens,
                   "first_token": job.first}
        try:
            handle = self.store.put(room, payload)
        except ValueError as err:
            raise EngineError(400, str(err)) from None
        if not await self.store.wait_fetched(room, handle, self.cfg.bootstrap_timeout):
            self.stats.bootstrap_timeouts += 1
            raise EngineError(500, f"bootstrap timeout: no decode server fetched the KV of bootstrap_room {room} "
                                   f"within {self.cfg.bootstrap_timeout:g} s", "BootstrapTimeout")


def _check_decode_boot(boot: Boot | None, stats) -> None:
    if boot is None or not boot.given:
        stats.pd_rejected += 1
        raise EngineError(400, "this server runs with --disaggregation-mode decode and needs bootstrap_host, "
                               "bootstrap_port and bootstrap_room in the request (send it through a PD router)")
    missing = [n for n in ("host", "port", "room") if getattr(boot, n) is None]
    if missing:
        stats.pd_rejected += 1
        raise EngineError(400, f"decode request is missing bootstrap_{missing[0]} (a PD router must send the "
                               f"prefill's bootstrap_host, bootstrap_port and bootstrap_room; none is substituted)")
    if not isinstance(boot.port, int) or isinstance(boot.port, bool) or not 0 < boot.port < 65536:
        raise EngineError(400, f"bootstrap_port {boot.port!r} is not a TCP port")
    if not isinstance(boot.room, int) or isinstance(boot.room, bool):
        raise EngineError(400, f"bootstrap_room {boot.room!r} must be an integer")
    if not isinstance(boot.host, str) or not boot.host:
        raise EngineError(400, f"bootstrap_host {boot.host!r} must be a host name or address")

