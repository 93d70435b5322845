"""`hpcserve doctor RECIPE`: check every node the recipe's job would get before the job wastes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from hpcserve.cli.common import console, guarded


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def doctor(recipe: Path, set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a.b=value."),
               cluster: Optional[str] = typer.Option(None, "--cluster", help="Cluster profile YAML."),
               run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where the checks write (shared "
                                                                              "filesystem; default runs/...)."),
               timeout: float = typer.Option(600, help="Seconds the checks may take, queueing included."),
               as_json: bool = typer.Option(False, "--json", help="One JSON document instead of lines.")):
        """On every node the job would get: environment, address, image, GPUs, IB device, model, ports, reach
        of the head node. One line per failed check naming the node and the fix; exit 2 on any failure."""
        from dataclasses import replace

        from hpcserve.api import load_plans, write_plans
        from hpcserve.backends.base import new_run_dir
        from hpcserve.doctor.job import run_doctor
        plans = load_plans(recipe, set_ or [], cluster)
        loaded, plan = max(plans, key=lambda lp: lp[1].num_nodes)   # a sweep: the largest point
        out = run_dir or new_run_dir(f"doctor-{plan.name}")
        [d] = write_plans([(replace(loaded, point={}), plan)], out)
        report = run_doctor(plan, Path(d), getattr(loaded.recipe.cluster, "slurm_version", None), timeout=timeout,
                            queue_timeout=int(min(timeout, 300)))
        if as_json:
            sys.stdout.write(json.dumps({"ok": report.ok, "run_dir": str(d), "failures": report.failures,
                                         "nodes": report.nodes}, indent=1) + "\n")
        else:
            for line in report.summary_lines():
                console.print(line, markup=False)
            for line in report.failures:
                console.print(line, markup=False)
        if not report.ok:
            raise typer.Exit(2)
