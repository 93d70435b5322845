"""`hpcserve batch RECIPE --input IN --output OUT` and `hpcserve batch-merge`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from hpcserve.cli.common import console, guarded


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def batch(recipe: Path, input: Path = typer.Option(..., "--input", help="Input JSONL."),
              output: Path = typer.Option(..., "--output", help="Output JSONL (appended, resumable)."),
              shards: int = typer.Option(1, help="Job array size; shard i answers rows i mod N."),
              concurrency: Optional[int] = typer.Option(None, help="Requests in flight per deployment."),
              set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a.b=value."),
              cluster: Optional[str] = typer.Option(None, "--cluster", help="Cluster profile YAML."),
              run_dir: Optional[Path] = typer.Option(None, "--run-dir"),
              wait: bool = typer.Option(True, help="Wait for the batch to finish, then merge shards."),
              timeout: float = typer.Option(86400, help="Seconds to wait.")):
        """Run an offline batch: the recipe's deployment plus a driver answering every row exactly once."""
        from hpcserve.api import run_batch_job
        ov = list(set_ or []) + [f"batch.input={input.resolve()}", f"batch.output={output.resolve()}",
                                 f"batch.shards={shards}"]
        if concurrency:
            ov.append(f"batch.concurrency={concurrency}")
        t0 = time.monotonic()
        summary = run_batch_job(recipe, ov, cluster, run_dir, wait=wait, timeout=timeout,
                                echo=lambda m: console.print(m, markup=False))
        console.print(f"{summary} ({time.monotonic() - t0:.0f}s)", markup=False)

    @app.command("batch-merge")
    @guarded
    def batch_merge(input: Path = typer.Option(..., "--input"), output: Path = typer.Option(..., "--output"),
                    shards: int = typer.Option(..., help="Number of shard parts."),
                    allow_missing: bool = typer.Option(False, help="Merge even with rows missing.")):
        """Merge OUTPUT.part-IIII-of-NNNN files into OUTPUT, in input order."""
        from hpcserve.batch import merge_shards
        s = merge_shards(input, output, shards, allow_missing)
        console.print(f"merged {s.rows} rows ({s.errors} errors, {s.missing} missing) into {s.output_path}",
                      markup=False)
