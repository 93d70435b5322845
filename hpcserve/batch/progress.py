"""Showing batch progress: a rich progress bar on a terminal, a log line otherwise, and the run's
status hash in Redis (read by ``hpcserve status``).

Redis fields written into ``hpcserve:{run_id}:status`` (prefix ``batch_`` by default):
``batch_state`` (running|stopped|aborted|complete), ``batch_done``, ``batch_failed``, ``batch_total``
(empty until the input was counted), ``batch_rows_per_s``, ``batch_shard`` ("i/n"), ``batch_updated``
(unix time).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from hpcserve.batch.driver import BatchSummary
from hpcserve.registry import set_status

log = logging.getLogger("hpcserve.batch")


class RedisStatus:
    """A ``status`` callable for run_batch. Writes at most every ``every`` seconds (always for a final
    state); a Redis failure is logged once and never stops the batch."""

    def __init__(self, redis: Any, run_id: str, prefix: str = "batch_", every: float = 2.0) -> None:
        self.redis = redis
        self.run_id = run_id
        self.prefix = prefix
        self.every = every
        self._last = 0.0
        self._warned = False

    def fields(self, s: BatchSummary, state: str) -> dict[str, Any]:
        p = self.prefix
        return {
            f"{p}state": state, f"{p}done": s.done, f"{p}failed": s.failed,
            f"{p}total": "" if s.total is None else s.total, f"{p}rows_per_s": f"{s.rows_per_s:.2f}",
            f"{p}shard": f"{s.shard_index}/{s.num_shards}", f"{p}updated": f"{time.time():.3f}",
        }

    async def __call__(self, s: BatchSummary, state: str) -> None:
        now = time.monotonic()
        if state == "running" and now - self._last < self.every:
            return
        self._last = now
        try:
            await set_status(self.redis, self.run_id, **self.fields(s, state))
        except Exception as e:  # Redis is for display only here
            if not self._warned:
                log.warning("cannot write batch progress to Redis (%s); the batch goes on", e)
                self._warned = True


class ProgressBar:
    """A ``progress`` callable: a rich bar when stderr is a terminal, else a log line every ``log_every`` s."""

    def __init__(self, description: str = "batch", log_every: float = 30.0) -> None:
        self.description = description
        self.log_every = log_every
        self._last_log = 0.0
        self._bar = None
        self._task = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} rows/s  failed {task.fields[failed]}"),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=False)

    def __enter__(self) -> "ProgressBar":
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=None, rate="0", failed=0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, s: BatchSummary) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=s.done, total=s.total, rate=f"{s.rows_per_s:.1f}",
                             failed=s.failed)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            total = "?" if s.total is None else s.total
            where = "" if self.description == "batch" else f"{self.description}: "
            log.info("%s%d/%s rows done, %d failed, %.1f rows/s", where, s.done, total, s.failed, s.rows_per_s)
