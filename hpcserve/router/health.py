"""Active health probes: GET /health on every worker each interval, feeding the same breaker that
passive failures (errors on real requests) feed. Ejected workers keep being probed until readmitted."""

from __future__ import annotations

import asyncio
import logging

from hpcserve.http import UpstreamError
from hpcserve.router.workers import Worker, WorkerSet

log = logging.getLogger("hpcserve.router")


class HealthChecker:
    def __init__(self, workers: WorkerSet, *, interval: float = 2.0, timeout: float = 5.0,
                 path: bytes = b"/health") -> None:
        self.workers = workers
        self.interval = interval
        self.timeout = timeout
        self.path = path

    async def probe(self, w: Worker) -> bool:
        try:
            status, _, _ = await w.pool.fetch(b"GET", self.path, timeout=self.timeout)
        except UpstreamError as err:
            reason = f"health probe: {err}"
        else:
            if status == 200:
                if w.id in self.workers.workers:
                    self.workers.record_success(w)
                return True
            reason = f"health probe answered HTTP {status}"
        if w.id in self.workers.workers:
            self.workers.record_failure(w, reason)
        return False

    async def run_once(self) -> None:
        workers = self.workers.all()
        if workers:
            await asyncio.gather(*(self.probe(w) for w in workers))

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # a probe bug must not stop health checking
                log.exception("health probe round failed")
            await asyncio.sleep(self.interval)
