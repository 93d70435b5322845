"""Progress of long verbs as the login node sees it. `hpcserve batch`: rows answered and failed, read from
the output file(s) the driver appends to (the same on the local backend and on Slurm, and no Redis needed).
`up` and `submit --wait`: workers ready per role, from `hpcserve status`'s view of the run. A live line on a
terminal; otherwise one plain line at the start, every ``every`` seconds and at the end."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


class OutputTail:
    """Counts complete rows and error rows of a growing JSONL file, reading only what was appended."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.pos = 0
        self.rows = 0
        self.errors = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1          # a torn last line is counted once it is complete
        for line in data[:end].splitlines():
            if line.strip():
                self.rows += 1
                self.errors += b'"error":' in line   # only a key can be spelled so in JSON bytes
        self.pos += end


class BatchProgress:
    """``tick()`` once in a while (the wait loops call it about once a second); ``close()`` at the end."""

    def __init__(self, outputs: list[str | os.PathLike], total: int, every: float = 10.0, stream=None,
                 tty: bool | None = None):
        self.tails = [OutputTail(p) for p in outputs]
        self.total = total
        self.every = every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        for t in self.tails:
            t.poll()
        self.start_rows = self.done
        self.t0 = time.monotonic()   # moved up to the last poll before the first new row: startup is not rate
        self._last_line = None
        self._bar = self._task = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self._bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("failed {task.fields[failed]}  {task.fields[rate]} rows/s  ETA"),
                                 TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("batch", total=total, completed=self.done, failed=0, rate="0.0")

    @property
    def done(self) -> int:
        return sum(t.rows for t in self.tails)

    @property
    def failed(self) -> int:
        return sum(t.errors for t in self.tails)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return (self.done - self.start_rows) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return (f"batch: {self.done}/{self.total} rows done, {self.failed} failed, {rate:.1f} rows/s, "
                f"ETA {eta}")

    def tick(self) -> None:
        for t in self.tails:
            t.poll()
        if self.done == self.start_rows:
            self.t0 = time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total), failed=self.failed,
                             rate=f"{self.rate:.1f}")
            return
        now = time.monotonic()
        if self._last_line is None or now - self._last_line >= self.every:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        self.tick()
        if self._bar is not None:
            self._bar.stop()
        else:
            print(self.line(), file=self.stream, flush=True)


class ReadinessProgress:
    """``tick(run_dir, status=None)`` while a deployment starts: which workers of each role are ready (a live
    line on a terminal, else a line every ``every`` seconds of waiting). The status is read in a background
    thread (Redis and the control API can take a second to answer), so the
    wait itself notices readiness as fast as without progress."""

    def __init__(self, every: float = 10.0, stream=None, tty: bool | None = None, interval: float = 1.0):
        self.every, self.interval = every, interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        # not a terminal: the first line after ``every`` seconds, so a quick start prints nothing extra
        self._last_line = None if self.tty else time.monotonic()
        self._printed = False
        self._planned: dict[str, int] = {}
        self._thread = None
        self._stop = threading.Event()

    def _plan_counts(self, run_dir: Path) -> dict[str, int]:
        from hpcserve.plan.model import Plan
        from hpcserve.rundir import RunPaths
        try:
            plan = Plan.from_json((RunPaths(run_dir) / RunPaths.PLAN).read_bytes())
        except (OSError, ValueError):
            return {}
        counts: dict[str, int] = {}
        for p in plan.processes:
            if p.kind == "engine" and p.role and p.worker_id:
                counts[p.role] = counts.get(p.role, 0) + 1
        return counts

    def line(self, phase: str, workers: dict) -> str:
        roles = sorted(set(self._planned) | set(workers))
        parts = [f"{r} {workers.get(r, {}).get('ready', 0)}/{self._planned.get(r, '?')} ready" for r in roles]
        phase = "starting" if phase == "unknown" else phase
        return f"waiting: {phase}" + (f"; workers {', '.join(parts)}" if parts else "")

    def tick(self, run_dir: Path, status=None) -> None:
        if self._thread is None:
            self._planned = self._plan_counts(Path(run_dir))
            self._show(self.line("starting", {}))   # at once: what it waits for
            self._thread = threading.Thread(target=self._watch, args=(Path(run_dir),), daemon=True)
            self._thread.start()

    def _watch(self, run_dir: Path) -> None:
        from hpcserve.status import collect
        while not self._stop.is_set():
            try:
                [status] = collect([str(run_dir)])
            except Exception:   # noqa: BLE001 - progress is display only; the wait has its own bound
                status = None
            if status is not None and not self._stop.is_set():
                self._show(self.line(status.phase, status.workers))
            self._stop.wait(self.interval)

    def _show(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            print(f"\r\x1b[2K{text}", end="", file=self.stream, flush=True)
            self._printed = True
        elif self._last_line is None or now - self._last_line >= self.every:
            self._last_line = now
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.tty and self._printed:
            print("", file=self.stream, flush=True)
