"""Progress of `hpcserve batch` as the login node sees it: rows answered and failed, read from the output
file(s) the driver appends to (the same on the local backend and on Slurm, and no Redis needed). A rich bar
on a terminal; otherwise one plain line at the start, every ``every`` seconds and at the end."""

from __future__ import annotations

import os
import sys
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
        self.t0 = time.monotonic()
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
