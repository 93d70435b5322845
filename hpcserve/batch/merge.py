"""Merging shard outputs into one output in input order.

Shard ``i`` of ``n`` writes ``<output>.part-<iiii>-of-<nnnn>`` (4 digits, zero-padded, e.g.
``out.jsonl.part-0003-of-0008``); the row on 1-based input line L belongs to shard (L - 1) mod n. The
merge reads the input once, and for each input row copies that row's output line, byte for byte, from its
shard's part. An id used by several input rows is written once, from its first row. The merged file is
written next to the output and renamed into place, so a crash never leaves a half-merged output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hpcserve.batch.io import iter_lines, row_key
from hpcserve.batch.rows import input_key
from hpcserve.errors import HpcserveError

EMITTED = -1
PART_BITS = 20  # up to a million shards; offsets up to 2**43 bytes


def part_path(output_path: str | os.PathLike, shard_index: int, num_shards: int) -> str:
    return f"{os.fspath(output_path)}.part-{shard_index:04d}-of-{num_shards:04d}"


@dataclass
class MergeSummary:
    output_path: str
    rows: int = 0  # rows written to the merged output
    errors: int = 0  # error rows among them
    duplicates: int = 0  # input rows skipped because an earlier row had the same id
    missing: int = 0  # input rows with no output row in their part
    first_missing: str = ""


def _index_parts(parts: list[str]) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """key -> (offset << PART_BITS | part) for complete rows; a key also found in another part (an id
    repeated across shards) goes to the small ``extra`` map under (key, part)."""
    index: dict[str, int] = {}
    extra: dict[tuple[str, int], int] = {}
    for part_no, path in enumerate(parts):
        offset = 0
        with open(path, "rb") as f:
            for raw in f:
                start, offset = offset, offset + len(raw)
                if not raw.endswith(b"\n"):
                    break  # a torn tail: not a row
                got = row_key(raw[:-1])
                if got is None:
                    continue
                key = got[0]
                packed = start << PART_BITS | part_no
                if key not in index:
                    index[key] = packed
                elif index[key] & ((1 << PART_BITS) - 1) != part_no:
                    extra.setdefault((key, part_no), packed)
    return index, extra


def merge(input_path: str | os.PathLike, output_path: str | os.PathLike, parts: list[str],
          allow_missing: bool = False) -> MergeSummary:
    """Write one output ordered by input order from ``parts`` (parts[i] is shard i of len(parts))."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    absent = [p for p in parts if not os.path.isfile(p)]
    if absent:
        raise HpcserveError(f"missing shard output {absent[0]} ({len(absent)} of {len(parts)} parts "
                            "missing): run those shards first")
    if not os.path.isfile(input_path):
        raise HpcserveError(f"batch input {input_path} does not exist (pass the input the shards ran on)")
    n = len(parts)
    index, extra = _index_parts(parts)
    summary = MergeSummary(output_path)
    tmp = f"{output_path}.merging"
    files = [open(p, "rb") for p in parts]
    try:
        with open(tmp, "wb") as out:
            for line_no, raw in iter_lines(input_path):
                shard = (line_no - 1) % n
                key = input_key(raw, line_no)
                packed = index.get(key)
                if packed == EMITTED:
                    summary.duplicates += 1
                    continue
                if packed is not None and packed & ((1 << PART_BITS) - 1) != shard:
                    packed = extra.get((key, shard))
                if packed is None:
                    summary.missing += 1
                    summary.first_missing = summary.first_missing or f"line {line_no} (id {key})"
                    continue
                f = files[shard]
                f.seek(packed >> PART_BITS)
                row = f.readline()
                out.write(row)
                summary.rows += 1
                # In JSON bytes '"error":' can only be a key (inside a string the quote is escaped).
                summary.errors += b'"error":' in row
                index[key] = EMITTED
            out.flush()
            os.fsync(out.fileno())
        if summary.missing and not allow_missing:
            raise HpcserveError(
                f"{summary.missing} input rows have no output yet (first: {summary.first_missing}); "
                "resume the unfinished shards, or merge with --allow-missing")
        os.replace(tmp, output_path)
    finally:
        for f in files:
            f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return summary


def merge_shards(input_path: str | os.PathLike, output_path: str | os.PathLike, num_shards: int,
                 allow_missing: bool = False) -> MergeSummary:
    """Merge the ``num_shards`` parts named after ``output_path`` into ``output_path``."""
    if num_shards < 1:
        raise HpcserveError(f"num_shards must be at least 1, got {num_shards}")
    parts = [part_path(output_path, i, num_shards) for i in range(num_shards)]
    return merge(input_path, output_path, parts, allow_missing)
