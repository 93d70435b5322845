"""Iteration-level scheduling: every iteration advances each running sequence by one step.

New requests join between iterations (up to ``max_running``), so a short request never waits for a long
one to finish and a stream gets one event per step. Steps are not fused into one batched tensor op: each
sequence runs the same kernels as the single-process oracle, which keeps outputs bit-identical to it.
All model work runs on one worker thread; the event loop only schedules and writes responses.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from hpcserve.torchengine import logprobs
from hpcserve.torchengine.model import KVCache, TinyLlama
from hpcserve.torchengine.sampling import Sampling, sample


class Seq:
    """One request's sequence. ``prefill_only``: stop after the first token (a PD prefill server)."""

    __slots__ = ("prompt", "sp", "out", "cache", "prefill_only", "on_step", "future", "error", "top", "prompt_lp",
                 "in_rows", "out_rows")

    def __init__(self, prompt: list[int], sp: Sampling, *, prefill_only: bool = False,
                 first: int | None = None, cache: KVCache | None = None,
                 on_step: Callable[["Seq"], None] | None = None, top: int | None = None,
                 prompt_lp: bool = False, first_row: logprobs.Row | None = None) -> None:
        self.prompt, self.sp, self.prefill_only, self.on_step = prompt, sp, prefill_only, on_step
        self.out: list[int] = [] if first is None else [first]
        self.cache = cache
        self.top = top              # None: no log-probabilities; else how many alternatives per position
        self.prompt_lp = prompt_lp  # also the prompt's (one forward pass computes them with the prefill)
        self.in_rows: list[logprobs.Row] | None = None
        self.out_rows: list[logprobs.Row] = [] if first_row is None else [first_row]
        self.future: asyncio.Future | None = None
        self.error: Exception | None = None

    @property
    def finished(self) -> bool:
        if self.error is not None:
            return True
        if self.cache is None:
            return False
        return (self.prefill_only or len(self.out) >= self.sp.max_new_tokens
                or (bool(self.out) and self.sp.stops(self.out[-1])))

    def step(self, model: TinyLlama) -> None:
        """Prefill (first token) or one decode step; the same calls as sampling.prefill/decode."""
        try:
            if self.cache is None:
                if self.top is not None and self.prompt_lp:
                    logits, self.cache, prompt_logits = model(self.prompt, 0, None, all_logits=True)
                    self.in_rows = logprobs.prompt_rows(prompt_logits, self.prompt[1:], self.top)
                else:
                    logits, self.cache = model(self.prompt, 0, None)
                self.out.append(sample(logits, self.sp, 0))
            else:
                logits, self.cache = model([self.out[-1]], len(self.prompt) + len(self.out) - 1, self.cache)
                self.out.append(sample(logits, self.sp, len(self.out)))
            if self.top is not None:
                self.out_rows.append(logprobs.row(logits, self.out[-1], self.top))
        except (ValueError, RuntimeError) as err:
            self.error = err


def _iterate(model: TinyLlama, seqs: list[Seq]) -> None:
    for s in seqs:
        s.step(model)


class Scheduler:
    def __init__(self, model: TinyLlama, max_running: int) -> None:
        self.model = model
        self.max_running = max_running
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="torch-model")
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.iterations = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, seq: Seq) -> Seq:
        """Run the sequence to its end; raises the step's error (e.g. context too long)."""
        seq.future = asyncio.get_running_loop().create_future()
        if seq.finished:           # a decode with max_new_tokens 1 already has its token
            return seq
        self.waiting.append(seq)
        self.wake.set()
        try:
            await seq.future
        finally:
            if seq in self.waiting:   # the client went away before it ran
                self.waiting.remove(seq)
        if seq.error is not None:
            raise seq.error
        return seq

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.waiting and len(self.running) < self.max_running:
                s = self.waiting.popleft()
                if not s.future.done():
                    self.running.append(s)
            if not self.running:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = list(self.running)
            await loop.run_in_executor(self.pool, _iterate, self.model, batch)
            self.iterations += 1
            for s in batch:
                done = s.finished
                if s.on_step is not None and s.error is None and not s.future.done():
                    s.on_step(s)
                if done or s.future.done():
                    self.running.remove(s)
                    if not s.future.done():
                        s.future.set_result(None)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
