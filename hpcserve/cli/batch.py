"""`hpcserve batch RECIPE --input IN --output OUT` and `hpcserve batch-merge`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from hpcserve.cli.common import ClusterOpt, SetOpt, console, err_console, fail, guarded

EXIT_ROWS_FAILED = 1   # --strict: the batch completed but some rows are error rows


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def batch(recipe: Path = typer.Argument(..., help="Recipe YAML (its deployment answers the rows)."),
              input: Path = typer.Option(..., "--input", help="Input JSONL, one request per line."),
              output: Path = typer.Option(..., "--output", help="Output JSONL (appended, resumable)."),
              shards: int = typer.Option(1, help="Job array size; shard i answers rows i mod N."),
              concurrency: Optional[int] = typer.Option(None, help="Requests in flight per deployment."),
              set_: Optional[List[str]] = SetOpt, cluster: Optional[str] = ClusterOpt,
              run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/...)."),
              wait: bool = typer.Option(True, help="Wait for the batch to finish, then order/merge the output."),
              timeout: float = typer.Option(86400, help="Seconds to wait for the batch."),
              strict: bool = typer.Option(False, "--strict", help="Exit 1 when any row failed (default: exit 0 "
                                                                   "with a warning line).")):
        """Run an offline batch: the recipe's deployment plus a driver answering every row exactly once.
        Progress (rows done, failed, rows/s, ETA) on stderr; the output ends in input order."""
        from hpcserve.api import batch_outputs, run_batch_job
        from hpcserve.batch.io import count_rows
        from hpcserve.cli.progress import BatchProgress
        from hpcserve.recipe.load import load_recipe
        ov = list(set_ or []) + [f"batch.input={input.resolve()}", f"batch.output={output.resolve()}",
                                 f"batch.shards={shards}"]
        if concurrency:
            ov.append(f"batch.concurrency={concurrency}")
        if not input.is_file():
            fail(f"batch input {input} does not exist; fix --input")
        [lr] = load_recipe(recipe, ov, cluster)[:1]
        t0 = time.monotonic()
        progress = None

        def tick() -> None:
            nonlocal progress
            if progress is None:   # created once the deployment runs: the first line says where it starts
                progress = BatchProgress(batch_outputs(lr.recipe.batch), count_rows(input))
            progress.tick()
        try:
            summary = run_batch_job(recipe, ov, cluster, run_dir, wait=wait, timeout=timeout,
                                    echo=lambda m: console.print(m, markup=False), tick=tick)
        finally:
            if progress is not None:
                progress.close()
        console.print(f"{summary} ({time.monotonic() - t0:.0f}s)", markup=False)
        errors = getattr(summary, "errors", 0)
        if errors:
            err_console.print(f"warning: {errors} of {summary.rows} rows failed (their output rows carry an "
                              f"\"error\" field: {output})", markup=False)
            if strict:
                raise typer.Exit(EXIT_ROWS_FAILED)

    @app.command("batch-merge")
    @guarded
    def batch_merge(input: Path = typer.Option(..., "--input", help="The input JSONL the batch ran on."),
                    output: Path = typer.Option(..., "--output", help="The output JSONL (shard parts are named "
                                                                      "after it)."),
                    shards: int = typer.Option(1, help="Number of shard parts; 1 puts OUTPUT itself in input "
                                                       "order."),
                    allow_missing: bool = typer.Option(False, help="Merge even with rows missing.")):
        """Merge OUTPUT.part-IIII-of-NNNN files into OUTPUT in input order (--shards 1: reorder OUTPUT)."""
        from hpcserve.batch import merge, merge_shards
        s = (merge_shards(input, output, shards, allow_missing) if shards > 1
             else merge(input, output, [output], allow_missing))
        console.print(f"merged {s.rows} rows ({s.errors} errors, {s.missing} missing) into {s.output_path}",
                      markup=False)
