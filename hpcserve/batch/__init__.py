"""Offline batch inference: stream a JSONL input through the router, exactly once, resumable, sharded.

Public API: ``run_batch`` (one shard, async), ``detect_complete``, ``merge`` / ``merge_shards`` /
``part_path``, ``main`` (the ``python -m hpcserve.batch`` entry point). See docs/batch.md.
"""

from hpcserve.batch.cli import main
from hpcserve.batch.driver import BatchSummary, detect_complete, run_batch
from hpcserve.batch.merge import MergeSummary, merge, merge_shards, part_path

__all__ = ["BatchSummary", "MergeSummary", "detect_complete", "main", "merge", "merge_shards", "part_path",
           "run_batch"]
