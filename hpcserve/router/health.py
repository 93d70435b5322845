"""Active health probes: GET /health on every worker once per round, feeding the same breaker that
passive failures (errors on real requests) feed. Ejected workers keep being probed until readmitted.

Timing, so that a stalled worker is out within two probe intervals of its first failed probe:
- rounds start every ``interval`` seconds on a fixed clock; a slow probe never delays other workers'
  probes (each worker is probed by its own task, at most one probe per worker at a time);
- the probe timeout is capped at the interval, and a probe that gets no answer within it means the worker
  is stalled (a live server answers its health endpoint): that ejects at once, and ``on_stalled`` moves
  the requests waiting on it that may move (see Dispatcher.worker_stalled);
- any other failure (refused, reset, 5xx) is re-probed at once, a few times at short gaps, so that
  ``eject_after`` consecutive failures accumulate within the same round instead of over N rounds.
Rounds are numbered (``WorkerSet.probe_round``) and each ejection records the round of the first failed
probe and the round it happened in, so tests can check the timing without a clock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from hpcserve.http import UpstreamError
from hpcserve.router.workers import CLOSED, Worker, WorkerSet

log = logging.getLogger("hpcserve.router")


class HealthChecker:
    def __init__(self, workers: WorkerSet, *, interval: float = 2.0, timeout: float | None = None,
                 path: bytes = b"/health", on_stalled: Callable[[Worker], None] | None = None) -> None:
        self.workers = workers
        self.interval = interval
        self.timeout = min(timeout or interval, interval)
        self.path = path
        self.on_stalled = on_stalled
        # gap between the re-probes after a quick failure: eject_after of them fit in half an interval
        self.recheck_gap = interval / (2 * workers.eject_after)
        self.probing: set[Worker] = set()
        self._tasks: set[asyncio.Task] = set()

    async def probe(self, w: Worker) -> bool:
        """One probe; its outcome goes to the breaker. True when the worker answered 200."""
        stalled = False
        sent_in = self.workers.probe_round
        # a timer of its own, not only the pool's watchdog (100 ms ticks): the timeout decides the round
        task = asyncio.ensure_future(w.pool.fetch(b"GET", self.path, timeout=self.timeout + 1.0))
        try:
            # If this router's own loop was late (CPU starved, a pause), socket reads that are due run before
            # the timeout is seen, so an answer that came in meanwhile counts (test_router_health checks it).
            await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            stalled = True
            reason = f"health probe: no answer within {self.timeout:g} s (stalled)"
        elif isinstance(task.exception(), UpstreamError):
            reason = f"health probe: {task.exception()}"
        else:
            status = task.result()[0]  # any other exception is a bug: raised to the caller
            if status == 200:
                if w.id in self.workers.workers:
                    self.workers.record_success(w)
                return True
            reason = f"health probe answered HTTP {status}"
        if w.id in self.workers.workers:
            ejected = self.workers.record_failure(w, reason, stalled=stalled, probe_round=sent_in)
            if ejected and stalled and self.on_stalled is not None:
                self.on_stalled(w)
        return False

    async def check(self, w: Worker) -> None:
        """Probe ``w``; after a failure that did not eject it, probe again at short gaps until it answers or
        ``eject_after`` consecutive failures eject it."""
        tries = 1
        ok = await self.probe(w)
        while not ok and w.circuit == CLOSED and tries < self.workers.eject_after and w.id in self.workers.workers:
            await asyncio.sleep(self.recheck_gap)
            tries += 1
            ok = await self.probe(w)

    def start_round(self) -> None:
        self.workers.probe_round += 1
        for w in self.workers.all():
            if w not in self.probing:
                self.probing.add(w)
                task = asyncio.get_running_loop().create_task(self._check(w))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _check(self, w: Worker) -> None:
        try:
            await self.check(w)
        except Exception:  # a probe bug must not stop health checking
            log.exception("health probe of %s failed", w.id)
        finally:
            self.probing.discard(w)

    async def run_once(self) -> None:
        """One round, waiting for its probes (tests and tools)."""
        self.start_round()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        k = 0
        try:
            while True:
                self.start_round()
                # the next round on a fixed clock; rounds the loop overslept are skipped, not bunched
                now = loop.time()
                k = max(k + 1, int((now - start) / self.interval) + 1)
                await asyncio.sleep(start + k * self.interval - now)
        finally:
            for t in list(self._tasks):
                t.cancel()
