"""Files of a batch: the streaming input reader, the resume scan (with torn-tail repair) and the one writer.

The input is never loaded whole: it is read in fixed-size chunks (in a worker thread when used from the
event loop) and split into lines. Blank lines are not rows but still count as line numbers, so line numbers
always match what an editor shows.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import orjson

from hpcserve.batch.rows import BadRow, Request, id_key, parse_line
from hpcserve.errors import HpcserveError

log = logging.getLogger("hpcserve.batch")
CHUNK = 1 << 20


def _split(buf: bytes, line_no: int) -> tuple[list[tuple[int, bytes]], bytes, int]:
    """Complete non-blank lines of ``buf`` numbered from ``line_no + 1``, the unfinished rest, the new count."""
    parts = buf.split(b"\n")
    rest = parts.pop()
    out = []
    for raw in parts:
        line_no += 1
        if raw.strip():
            out.append((line_no, raw))
    return out, rest, line_no


def iter_lines(path: str | os.PathLike, chunk: int = CHUNK) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes) for every non-blank line; the last line may lack a newline."""
    with open(path, "rb") as f:
        rest, line_no = b"", 0
        while data := f.read(chunk):
            lines, rest, line_no = _split(rest + data, line_no)
            yield from lines
        if rest.strip():
            yield line_no + 1, rest


async def aiter_lines(path: str | os.PathLike, chunk: int = CHUNK) -> AsyncIterator[list[tuple[int, bytes]]]:
    """Like iter_lines, but in batches, with file reads in a thread (a shared filesystem can stall)."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        rest, line_no = b"", 0
        while data := await asyncio.to_thread(f.read, chunk):
            lines, rest, line_no = _split(rest + data, line_no)
            if lines:
                yield lines
        if rest.strip():
            yield [(line_no + 1, rest)]
    finally:
        f.close()


def read_rows(path: str | os.PathLike, shard_index: int = 0, num_shards: int = 1
              ) -> Iterator[Request | BadRow]:
    """Parsed rows of one shard: row with 1-based line number L belongs to shard (L - 1) mod num_shards."""
    for line_no, raw in iter_lines(path):
        if (line_no - 1) % num_shards == shard_index:
            yield parse_line(raw, line_no)


def count_rows(path: str | os.PathLike, shard_index: int = 0, num_shards: int = 1) -> int:
    return sum(1 for line_no, _ in iter_lines(path) if (line_no - 1) % num_shards == shard_index)


@dataclass
class OutputScan:
    done: set[str] = field(default_factory=set)  # id keys with a row in the output
    rows: int = 0
    errors: int = 0  # error rows among them
    duplicates: int = 0  # ids found more than once (should never happen; reported, not fatal)
    bad_lines: int = 0  # unreadable complete lines followed by good ones (kept as they are)
    torn_bytes: int = 0  # bytes after the last good row: a torn tail
    repaired: bool = False
    size: int = 0


def row_key(line: bytes) -> tuple[str, bool] | None:
    """(id key, is an error row) of an output line, None if it is not a row. Lines this driver wrote
    start with the id (``{"id":"x",...`` or ``{"id":12,...``) and are read without a full JSON parse,
    which makes resume scans about three times faster; anything else is parsed."""
    if line.startswith(b'{"id":') and line.endswith(b"}"):
        if line[6:7] == b'"':
            end = line.find(b'"', 7)
            key = line[7:end]
            if end > 0 and b"\\" not in key and line[end + 1:end + 3] == b',"':
                try:
                    return key.decode(), line.startswith(b'error"', end + 3)
                except UnicodeDecodeError:
                    pass
        else:
            end = line.find(b',"', 6)
            key = line[6:end]
            if end > 0 and key.isdigit() and (key[:1] != b"0" or key == b"0"):
                return key.decode(), line.startswith(b'error"', end + 2)
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or "id" not in obj:
        return None
    return id_key(obj["id"]), "error" in obj


def scan_output(path: str | os.PathLike, repair: bool = False, chunk: int = CHUNK) -> OutputScan:
    """Ids already answered in an output file. A tail after the last good row (a line without its newline,
    or unreadable lines, left by a crash mid-write) is a torn tail; with ``repair`` it is copied to
    ``<path>.torn`` and cut off with one truncate. Truncation only drops bytes after the last complete
    row, so a crash during repair cannot lose a complete row: the next scan just repairs again."""
    scan = OutputScan()
    if not os.path.exists(path):
        return scan
    good_end = pos = 0
    pending_bad = 0
    with open(path, "rb") as f:
        rest = b""
        while data := f.read(chunk):
            parts = (rest + data).split(b"\n")
            rest = parts.pop()
            for raw in parts:
                pos += len(raw) + 1
                if not raw.strip():
                    continue
                got = row_key(raw)
                if got is None:
                    pending_bad += 1
                    continue
                key, is_error = got
                scan.bad_lines += pending_bad
                pending_bad = 0
                good_end = pos
                scan.rows += 1
                scan.errors += is_error
                if key in scan.done:
                    scan.duplicates += 1
                scan.done.add(key)
        scan.size = pos + len(rest)
    scan.torn_bytes = scan.size - good_end
    if scan.torn_bytes and repair:
        _cut_tail(path, good_end)
        scan.repaired = True
    return scan


def _cut_tail(path: str | os.PathLike, good_end: int) -> None:
    with open(path, "rb") as f:
        f.seek(good_end)
        tail = f.read()
    with open(f"{path}.torn", "ab") as side:  # kept for forensics; never read back
        side.write(tail + b"\n")
        side.flush()
        os.fsync(side.fileno())
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, good_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("%s: removed a torn tail of %d bytes after the last complete row (saved in %s.torn)",
                path, len(tail), path)


class OutputWriter:
    """The only writer of an output file. Rows are queued as finished lines; the writer task appends
    everything queued in one write (in a thread), so each row is either whole in the OS page cache or
    absent after a crash of this process; fsync every ``checkpoint_rows`` rows / ``checkpoint_s`` seconds
    and at close, so a machine crash loses at most one checkpoint of rows (they are redone on restart)."""

    def __init__(self, path: str | os.PathLike, checkpoint_rows: int = 1000, checkpoint_s: float = 5.0,
                 max_batch: int = 4096) -> None:
        self.path = os.fspath(path)
        self.checkpoint_rows = checkpoint_rows
        self.checkpoint_s = checkpoint_s
        self.max_batch = max_batch
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.written = 0
        self.synced = 0
        self._fd = -1
        self._last_sync = time.monotonic()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Open (creating it durably), lock against a second driver on the same file, start the task.
        Call before scanning the output, so nobody else appends between the scan and our writes."""
        self._fd = await asyncio.to_thread(open_locked, self.path)
        self._task = asyncio.create_task(self._run(), name="batch-writer")

    def put(self, line: bytes) -> None:
        self.queue.put_nowait(line)

    async def close(self) -> None:
        """Write what is queued, fsync, close. Safe to call once after start."""
        self.queue.put_nowait(None)
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        try:
            closing = False
            while not closing:
                first = await self.queue.get()
                batch = [] if first is None else [first]
                closing = first is None
                while not closing and len(batch) < self.max_batch and not self.queue.empty():
                    item = self.queue.get_nowait()
                    if item is None:
                        closing = True
                    else:
                        batch.append(item)
                if batch:
                    await asyncio.to_thread(_write_all, self._fd, b"".join(batch))
                    self.written += len(batch)
                if closing or self.written - self.synced >= self.checkpoint_rows or (
                        self.written > self.synced and time.monotonic() - self._last_sync >= self.checkpoint_s):
                    await asyncio.to_thread(os.fsync, self._fd)
                    self.synced = self.written
                    self._last_sync = time.monotonic()
        finally:
            os.close(self._fd)


def open_locked(path: str) -> int:
    """The output opened for appending, with an exclusive flock held for the life of the fd. A second
    driver on the same output (a requeued job whose old step still runs, two array tasks given the same
    shard) would write ids twice, so it is refused. Filesystems without flock support (some Lustre
    mounts) get a warning and no lock."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    created = not os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HpcserveError(f"another batch driver is writing {path}; stop it first (or wait for it "
                            "to exit) so no id is written twice") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            os.close(fd)
            raise
        log.warning("%s: the filesystem does not support locks (%s); make sure only one driver writes it",
                    path, e.strerror)
    if created:  # make the new directory entry durable too
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
