"""``python -m hpcserve.batch``: run one shard of a batch, check it, or merge shard outputs.

Exit codes: 0 all rows of the shard have an output row; 3 stopped by a signal with rows left (rerun the
same command to resume); 4 gave up early (router failing, output unwritable; also resumable);
2 a usage mistake (one-line message); 1 an unexpected error.
"""

from __future__ import annotations

from hpcserve import aio

import argparse
import asyncio
import logging
import os
import signal
import sys

import orjson

from hpcserve.batch.driver import BatchSummary, detect_complete, run_batch
from hpcserve.batch.merge import merge, merge_shards, part_path
from hpcserve.batch.progress import ProgressBar, RedisStatus
from hpcserve.cmdline.batch import BatchArgs, ShardArgs
from hpcserve.errors import HpcserveError, UsageError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED, EXIT_ABORTED = 0, 1, 2, 3, 4
log = logging.getLogger("hpcserve.batch")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise HpcserveError(f"hpcserve batch: {message} (see --help)")


def _parse(args: type[ShardArgs], argv: list[str]) -> ShardArgs:
    try:
        return args.from_argv(argv)
    except UsageError as e:
        raise HpcserveError(f"hpcserve batch: {e} (see --help)") from None


def build_merge_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hpcserve.batch merge",
                description="Merge shard outputs into one output in input order.")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--num-shards", type=int, help="merge OUTPUT.part-IIII-of-NNNN for i < N")
    group.add_argument("--parts", nargs="+", help="explicit part files, shard 0 first")
    p.add_argument("--allow-missing", action="store_true", help="merge even if some rows have no output")
    return p


def shard_output(output: str, shard_index: int, num_shards: int) -> str:
    return output if num_shards == 1 else part_path(output, shard_index, num_shards)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="hpcserve batch: %(message)s", stream=sys.stderr)
    try:
        if argv[:1] == ["merge"]:
            return _merge(build_merge_parser().parse_args(argv[1:]))
        if argv[:1] == ["check"]:
            a = _parse(ShardArgs, argv[1:])
            out = shard_output(a.output, a.shard_index, a.num_shards)
            return EXIT_OK if detect_complete(a.input, out, a.shard_index, a.num_shards) else EXIT_STOPPED
        args = _parse(BatchArgs, argv)
        summary = aio.run(_drive(args))
    except HpcserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_STOPPED
    print(orjson.dumps(summary.as_dict()).decode())
    print(_describe(summary), file=sys.stderr)
    if summary.complete:
        return EXIT_OK
    return EXIT_ABORTED if summary.aborted else EXIT_STOPPED


def _merge(a: argparse.Namespace) -> int:
    if a.parts:
        s = merge(a.input, a.output, a.parts, a.allow_missing)
    else:
        s = merge_shards(a.input, a.output, a.num_shards, a.allow_missing)
    print(f"merged {s.rows} rows ({s.errors} errors, {s.duplicates} duplicate ids, {s.missing} missing) "
          f"into {s.output_path}", file=sys.stderr)
    return EXIT_OK


async def _drive(a: BatchArgs) -> BatchSummary:
    if (a.redis_url is None) != (a.run_id is None):
        raise HpcserveError("--redis-url and --run-id go together (give both or neither)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    redis = status = None
    if a.redis_url:
        import redis.asyncio as aioredis
        redis = aioredis.from_url(a.redis_url, socket_timeout=5, socket_connect_timeout=5)
        status = RedisStatus(redis, a.run_id)
    output = shard_output(a.output, a.shard_index, a.num_shards)
    label = "batch" if a.num_shards == 1 else f"shard {a.shard_index}/{a.num_shards}"
    try:
        with ProgressBar(label) as bar:
            return await run_batch(
                a.input, output, a.router, concurrency=a.concurrency, max_retries=a.max_retries,
                request_timeout=a.request_timeout, shard_index=a.shard_index, num_shards=a.num_shards,
                progress=bar, stop_event=stop, api_key=os.environ.get(a.api_key_env) or None,
                model=a.model, stop_grace=a.stop_grace, checkpoint_rows=a.checkpoint_rows,
                checkpoint_s=a.checkpoint_seconds, status=status, api=a.api)
    finally:
        if redis is not None:
            await redis.aclose()


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if not stop.is_set():
        log.warning("%s: stopping: no new rows, finishing the rows in flight", signal.Signals(sig).name)
    stop.set()


def _describe(s: BatchSummary) -> str:
    head = ("complete" if s.complete else f"aborted: {s.aborted}" if s.aborted
            else "stopped, resumable (rerun the same command)")
    left = "?" if s.total is None else s.total - s.done
    return (f"{head}: {s.ok} ok, {s.failed} failed, {s.already_done} already done, {s.duplicates} duplicate "
            f"ids skipped, {left} rows left for the next run ({s.abandoned} abandoned in flight); "
            f"{s.rows_per_s:.1f} rows/s -> {s.output_path}")
