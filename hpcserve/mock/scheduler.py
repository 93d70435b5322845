"""Continuous-batching scheduler of the timing model, after SGLang's scheduler loop.

One loop runs iterations like an engine. Each iteration first admits waiting sequences while fewer than
``max_running`` run. If any of them needs a prefill, the iteration is that prefill batch, one forward pass
of a + b*(their prompt tokens) in which the running sequences make no progress (SGLang runs a new prefill
batch before the next decode step: scheduler.get_next_batch_to_run); otherwise it is one decode step of
c + d*batch over the running sequences. With SGLang's ``--enable-mixed-chunk`` the prefill batch and the
decode step share one iteration of both durations. A prefill yields the first token, each decode step one
more token per running sequence. Wall time = model time * time_scale.

Each sequence records the model time it spent queued (from its arrival: the rest of the iteration running
then, plus every whole iteration it waited), in its prefill batch and in decode steps, which meta_info
reports. The mock does not chunk prefills (SGLang splits a batch above --chunked-prefill-size tokens).

With time_scale 0 this class is not used at all: the server answers at once (see engine.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from hpcserve.mock.model import decode_step_ms, prefill_ms


class Seq:
    __slots__ = ("prompt_tokens", "total", "emitted", "needs_prefill", "queue_ms", "prefill_ms", "decode_ms",
                 "decode_steps", "waiter", "cancelled")

    def __init__(self, prompt_tokens: int, total: int, needs_prefill: bool):
        self.prompt_tokens = prompt_tokens
        self.total = total                  # tokens this server emits for the sequence
        self.emitted = 0
        self.needs_prefill = needs_prefill  # False on a PD decode server: the first token came with the KV
        self.queue_ms = 0.0
        self.prefill_ms = 0.0
        self.decode_ms = 0.0
        self.decode_steps = 0
        self.waiter: asyncio.Future | None = None
        self.cancelled = False

    def timing(self, scale: float) -> dict:
        return {"queue_ms": round(self.queue_ms, 6), "prefill_ms": round(self.prefill_ms, 6),
                "decode_ms": round(self.decode_ms, 6), "decode_steps": self.decode_steps, "time_scale": scale}


class Scheduler:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.scale = cfg.time_scale / 1000.0   # model ms -> wall seconds
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.iterations = 0
        self.mixed = bool(cfg.extra_args.get("enable_mixed_chunk"))
        self._busy_until = 0.0  # perf_counter time at which the running iteration ends (0: none running)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def submit(self, seq: Seq) -> None:
        rest = self._busy_until - time.perf_counter()
        if rest > 0:  # it waits for the iteration already running before it can be admitted
            seq.queue_ms += rest / self.scale
        self.waiting.append(seq)
        self._wake.set()

    async def progress(self, seq: Seq) -> int:
        """Wait until the sequence has more tokens than when called; returns the emitted count."""
        if seq.emitted >= seq.total:
            return seq.emitted
        seen = seq.emitted
        while seq.emitted == seen:
            seq.waiter = asyncio.get_running_loop().create_future()
            try:
                await seq.waiter
            except asyncio.CancelledError:
                seq.cancelled = True  # the client went away: free the slot at the next iteration
                raise
        return seq.emitted

    def cancel(self, seq: Seq) -> None:
        seq.cancelled = True

    async def _loop(self) -> None:
        cfg = self.cfg
        clock = time.perf_counter()   # the clock latencies are measured with (loop.time() may lag it)
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                clock = time.perf_counter()  # idle time does not count against later iterations
            self._drop_cancelled()
            decoding = [s for s in self.running if s.emitted >= 1]
            admitted: list[Seq] = []
            while self.waiting and len(self.running) < cfg.max_running:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    continue
                self.running.append(seq)
                admitted.append(seq)
            queued = list(self.waiting)  # waiting through this whole iteration: its time is queue time
            prefill = []
            for seq in admitted:
                if seq.needs_prefill:
                    prefill.append(seq)
                else:  # the KV arrived with the first token: nothing to compute
                    self._emit(seq)
            step = 0.0
            if prefill:  # one forward pass over the whole prefill batch
                step += prefill_ms(self.cfg, sum(seq.prompt_tokens for seq in prefill))
                if not self.mixed:
                    decoding = []  # the running sequences wait for the prefill batch
            if decoding:
                step += decode_step_ms(cfg, len(decoding))
            if step > 0:
                clock += step * self.scale
                self._busy_until = clock
                delay = clock - time.perf_counter()
                if delay > 0:
                    # uvloop rounds timers down to whole milliseconds: sleep again until the step is really over
                    while delay > 0:
                        await asyncio.sleep(delay)
                        delay = clock - time.perf_counter()
                else:
                    clock = time.perf_counter()  # overloaded: do not try to catch up
                    await asyncio.sleep(0)
                self._busy_until = 0.0
            else:
                await asyncio.sleep(0)
            self.iterations += 1
            for seq in queued:
                seq.queue_ms += step
            for seq in prefill:
                seq.prefill_ms += step
                self._emit(seq)
            for seq in decoding:
                seq.decode_ms += step
                seq.decode_steps += 1
                self._emit(seq)
            self.running = [s for s in self.running if s.emitted < s.total and not s.cancelled]

    def _emit(self, seq: Seq) -> None:
        if seq.emitted < seq.total:
            seq.emitted += 1
        w = seq.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.running):
            self.running = [s for s in self.running if not s.cancelled]
