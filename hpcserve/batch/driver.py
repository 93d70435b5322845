"""The batch driver: stream a shard of the input through the router and append one row per id.

Exactly once: ids already in the output are skipped; within a run an id is sent at most once (a later
input row with an id seen before is skipped and counted in ``duplicates``: writing it, even as an error,
would put that id in the output twice). Only rows that were fully written count as done, so anything
lost to a crash, a stop or an abort is simply sent again on the next run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from hpcserve.batch.client import Abandoned, Answer, RouterClient, Transient
from hpcserve.batch.io import OutputWriter, aiter_lines, count_rows, iter_lines, scan_output
from hpcserve.batch.rows import APIS, BadRow, Request, error_row, input_key, parse_line
from hpcserve.errors import HpcserveError

log = logging.getLogger("hpcserve.batch")


@dataclass
class BatchSummary:
    input_path: str
    output_path: str
    shard_index: int = 0
    num_shards: int = 1
    total: int | None = None  # non-blank input rows of this shard (None until counted)
    already_done: int = 0  # rows skipped because the output had their id at start
    ok: int = 0  # rows answered by this run
    failed: int = 0  # error rows written by this run (malformed rows included)
    duplicates: int = 0  # rows skipped because an earlier input row had the same id
    abandoned: int = 0  # rows sent but not written: stopped mid-flight (redone on restart)
    unsent: int = 0  # rows read but not sent because the run stopped (redone on restart)
    in_flight: int = 0
    stopped: bool = False  # the stop event ended the run early
    aborted: str | None = None  # why the driver gave up early (router unreachable, output unwritable)
    complete: bool = False  # every row of the shard has an output row
    repaired_bytes: int = 0  # torn tail cut from the output at start
    elapsed_s: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def done(self) -> int:
        return self.already_done + self.ok + self.failed + self.duplicates

    @property
    def rows_per_s(self) -> float:
        elapsed = self.elapsed_s or (time.monotonic() - self.started)
        return (self.ok + self.failed) / elapsed if elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("started")
        out.update(done=self.done, rows_per_s=round(self.rows_per_s, 2))
        return out


def detect_complete(input_path: str | os.PathLike, output_path: str | os.PathLike,
                    shard_index: int = 0, num_shards: int = 1) -> bool:
    """True when every row of the shard already has an output row: no engine is needed. Reads both files
    once, changes nothing (a torn tail is ignored here and repaired by the run)."""
    if not os.path.exists(output_path):
        return False
    done = scan_output(output_path).done
    return all(input_key(raw, line_no) in done for line_no, raw in iter_lines(input_path)
               if (line_no - 1) % num_shards == shard_index)


def _check_args(input_path: str, concurrency: int, max_retries: int, request_timeout: float,
                shard_index: int, num_shards: int) -> None:
    if not os.path.isfile(input_path):
        raise HpcserveError(f"batch input {input_path} does not exist (pass an existing JSONL file)")
    if concurrency < 1:
        raise HpcserveError(f"batch concurrency must be at least 1, got {concurrency}")
    if max_retries < 0 or request_timeout <= 0:
        raise HpcserveError("batch max_retries must be >= 0 and request_timeout > 0")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise HpcserveError(f"shard index {shard_index} is outside 0..{num_shards - 1} (num_shards={num_shards})")


async def run_batch(input_path: str | os.PathLike, output_path: str | os.PathLike, router_url: str, *,
                    concurrency: int = 64, max_retries: int = 3, request_timeout: float = 600.0,
                    shard_index: int = 0, num_shards: int = 1,
                    progress: Callable[[BatchSummary], None] | None = None,
                    stop_event: asyncio.Event | None = None, api_key: str | None = None,
                    model: str | None = None, stop_grace: float = 20.0,
                    abort_after_failures: int | None = None, checkpoint_rows: int = 1000,
                    checkpoint_s: float = 5.0, backoff_base: float = 0.5,
                    status: Callable[[BatchSummary, str], Any] | None = None,
                    progress_every: float = 0.5, api: str = "generate") -> BatchSummary:
    """Answer every row of one shard of ``input_path`` into ``output_path`` (appending; resumable).

    ``stop_event``: when set, no new row is taken; in-flight rows get ``stop_grace`` seconds, then are
    abandoned; the output is flushed and fsynced; the summary has ``stopped=True``.
    ``abort_after_failures``: this many rows in a row that used up their retries on service failures
    (connect, timeout, 5xx, 429) stop the run with ``aborted`` set, without writing those rows, so a dead
    router does not turn the whole input into error rows (default max(32, 2 * concurrency); 0 = never).
    ``api``: what prompt and input_ids rows are sent as: SGLang's /generate, or /v1/completions for an
    endpoint that serves OpenAI routes only (a Dynamo frontend).
    ``progress(summary)`` is called every ``progress_every`` seconds and at the end; ``status(summary,
    state)`` likewise (an async or sync callable; see ``hpcserve.batch.progress.RedisStatus``).
    """
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    _check_args(input_path, concurrency, max_retries, request_timeout, shard_index, num_shards)
    if api not in APIS:
        raise HpcserveError(f"batch api {api!r} is not one of {', '.join(APIS)}")
    if abort_after_failures is None:
        abort_after_failures = max(32, 2 * concurrency)
    client = RouterClient(router_url, concurrency=concurrency, max_retries=max_retries,
                          request_timeout=request_timeout, api_key=api_key, model=model,
                          backoff_base=backoff_base)  # checks the URL before any file is touched
    summary = BatchSummary(input_path, output_path, shard_index, num_shards)
    writer = OutputWriter(output_path, checkpoint_rows, checkpoint_s)
    try:
        await writer.start()  # takes the output's lock before the scan
    except OSError as e:
        raise HpcserveError(f"cannot open the batch output {output_path}: {e.strerror}") from None
    try:
        scan = await asyncio.to_thread(scan_output, output_path, True)
    except BaseException:
        await writer.close()
        raise
    summary.repaired_bytes = scan.torn_bytes
    run = _Run(summary, scan.done, stop_event or asyncio.Event(), abort_after_failures, concurrency, api)
    run.writer = writer
    reporter = asyncio.create_task(_report(run, progress, status, progress_every))
    counter = asyncio.create_task(asyncio.to_thread(count_rows, input_path, shard_index, num_shards))
    counter.add_done_callback(lambda t: setattr(summary, "total", None if t.exception() else t.result()))
    try:
        async with client:
            await run.drive(client, input_path, shard_index, num_shards, stop_grace)
    finally:
        await _finish(run, writer, reporter)
    if not counter.done():
        await counter
    # A stop or abort that came after the last row was written still leaves a complete output.
    summary.complete = (run.eof and summary.abandoned == 0 and summary.unsent == 0
                        and not run.writer_failed)
    await _call(progress, summary)
    await _call(status, summary, _state(summary))
    return summary


class _Run:
    """The mutable state of one run, shared by the reader, the workers and the writer."""

    def __init__(self, summary: BatchSummary, done: set[str], stop_event: asyncio.Event,
                 abort_after: int, concurrency: int, api: str = "generate") -> None:
        self.summary = summary
        self.api = api
        self.done = done  # ids in the output at start
        self.seen: set[str] = set()  # ids taken by this run
        self.stop_event = stop_event
        self.halt = asyncio.Event()  # stop or abort: no new rows
        self.abort_after = abort_after
        self.concurrency = concurrency
        self.queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=2 * concurrency)
        self.suspects: list[bytes] = []  # error rows held back while service failures continue
        self.streak = 0
        self.eof = False
        self.writer: OutputWriter | None = None
        self.writer_failed = False

    def write(self, line: bytes) -> None:
        if self.writer_failed:
            return  # the writer died; the run is aborting and the row will be redone
        self.writer.put(line)

    def abort(self, why: str) -> None:
        if not self.summary.aborted:
            log.error("batch stops early: %s", why)
            self.summary.aborted = why
        self.halt.set()

    async def drive(self, client: RouterClient, input_path: str, shard_index: int, num_shards: int,
                    grace: float) -> None:
        self.writer._task.add_done_callback(self._writer_ended)
        reader = asyncio.create_task(self._read(input_path, shard_index, num_shards))
        workers = [asyncio.create_task(self._work(client)) for _ in range(self.concurrency)]
        stopper = asyncio.create_task(self.stop_event.wait())
        halter = asyncio.create_task(self.halt.wait())
        everything = asyncio.gather(reader, *workers)
        try:
            await asyncio.wait({everything, stopper, halter}, return_when=asyncio.FIRST_COMPLETED)
            if everything.done():
                everything.result()  # re-raise a bug in the reader or a worker
                if self.suspects:  # the input ended during a failure streak: these rows did fail
                    self._flush_suspects()
                return
            if stopper.done():
                self.summary.stopped = True
            self.halt.set()
            client.stopping = True
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            while not self.queue.empty():
                if self.queue.get_nowait() is not None:
                    self.summary.unsent += 1
            for _ in workers:
                self.queue.put_nowait(None)
            await asyncio.wait(workers, timeout=max(0.0, grace))
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.summary.abandoned += len(self.suspects)
            self.suspects.clear()
        finally:
            for t in (stopper, halter):
                t.cancel()
            everything.cancel()
            await asyncio.gather(everything, stopper, halter, return_exceptions=True)

    async def _read(self, input_path: str, shard_index: int, num_shards: int) -> None:
        s = self.summary
        async for lines in aiter_lines(input_path):
            for line_no, raw in lines:
                if (line_no - 1) % num_shards != shard_index:
                    continue
                row = parse_line(raw, line_no, self.api)
                if row.key in self.done:
                    s.already_done += 1
                    continue
                if row.key in self.seen:
                    s.duplicates += 1
                    if s.duplicates <= 10:
                        log.warning("line %d: id %r was already used by an earlier row; skipped",
                                    line_no, row.id)
                    continue
                self.seen.add(row.key)
                if isinstance(row, BadRow):
                    self.write(error_row(row.id, row.error))
                    s.failed += 1
                else:
                    await self.queue.put(row)
                if self.halt.is_set():
                    return
        self.eof = True
        for _ in range(self.concurrency):
            await self.queue.put(None)

    async def _work(self, client: RouterClient) -> None:
        s = self.summary
        while True:
            req = await self.queue.get()
            if req is None:
                return
            if self.halt.is_set():
                s.unsent += 1
                continue
            s.in_flight += 1
            try:
                result = await client.run(req)
            except asyncio.CancelledError:
                s.abandoned += 1
                raise
            finally:
                s.in_flight -= 1
            self._record(result)

    def _record(self, result: Answer | Transient | Abandoned) -> None:
        s = self.summary
        if isinstance(result, Abandoned) or (self.halt.is_set() and isinstance(result, Transient)):
            s.abandoned += 1
        elif isinstance(result, Answer):
            self.write(result.line)
            if result.ok:
                s.ok += 1
                self.streak = 0
                self._flush_suspects()  # the service works, so the held rows failed on their own
            else:
                s.failed += 1
        else:
            self.streak += 1
            self.suspects.append(result.line)
            if self.abort_after and self.streak >= self.abort_after:
                self.abort(f"{self.streak} rows in a row failed after retries (last: {result.reason}); "
                           "is the router up? rerun the same command to resume")

    def _flush_suspects(self) -> None:
        for line in self.suspects:
            self.write(line)
        self.summary.failed += len(self.suspects)
        self.suspects.clear()

    def _writer_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.writer_failed = True
            self.abort(f"cannot write {self.writer.path}: {task.exception()}")


async def _finish(run: _Run, writer: OutputWriter, reporter: asyncio.Task) -> None:
    reporter.cancel()
    await asyncio.gather(reporter, return_exceptions=True)
    try:
        await writer.close()
    except OSError as e:
        run.writer_failed = True
        run.abort(f"cannot write {writer.path}: {e}")
    # Rows queued after the writer died are not on disk; they are redone on restart.
    run.summary.abandoned += writer.queue.qsize()
    run.summary.elapsed_s = time.monotonic() - run.summary.started


def _state(s: BatchSummary) -> str:
    if s.complete:
        return "complete"
    return "aborted" if s.aborted else "stopped" if s.stopped else "running"


async def _call(fn: Callable | None, *args: Any) -> None:
    if fn is None:
        return
    try:
        out = fn(*args)
        if asyncio.iscoroutine(out):
            await out
    except Exception as e:  # progress display must never break a batch
        log.warning("batch progress callback failed: %s", e)


async def _report(run: _Run, progress: Callable | None, status: Callable | None, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        await _call(progress, run.summary)
        await _call(status, run.summary, "running")
