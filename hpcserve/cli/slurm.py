"""`hpcserve submit / status / logs / cancel`: the Slurm verbs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from hpcserve.cli.common import console, err_console, fail, guarded, print_table
from hpcserve.rundir import RunPaths


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def submit(recipe: Path = typer.Argument(..., help="Recipe file."),
               set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a.b=value."),
               cluster: Optional[str] = typer.Option(None, "--cluster", help="Cluster profile YAML."),
               run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/...)."),
               wait: bool = typer.Option(False, "--wait", help="Wait until the endpoint is ready."),
               timeout: float = typer.Option(3600, help="Seconds --wait waits (queue time included).")):
        """Write the run dir, sbatch it, print job id and run dir (and the endpoint with --wait)."""
        from hpcserve.api import submit as api_submit
        from hpcserve.api import wait_ready
        runs = api_submit(recipe, set_ or [], cluster, run_dir,
                          on_note=lambda line: err_console.print(f"note: {line}", markup=False))
        for run in runs:
            console.print(f"job {run.job_id}  run dir {run.run_dir}", markup=False)
        if wait:
            from hpcserve.cli.progress import ReadinessProgress
            for run in runs:
                progress = ReadinessProgress()
                try:
                    ep = wait_ready(run, timeout, tick=progress.tick)
                finally:
                    progress.close()
                console.print(f"endpoint  {ep['url']}", markup=False)
                console.print(f"laptop    ssh -N -L {ep['port']}:{ep['host']}:{ep['port']} <login-node>  "
                              f"then http://localhost:{ep['port']}", markup=False)

    @app.command()
    @guarded
    def status(targets: List[str] = typer.Argument(..., help="Run dirs or job ids."),
               as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead.")):
        """Phase, Slurm state and reason, workers by role/state, endpoint (one squeue call for all)."""
        from hpcserve.status import collect
        sts = collect(list(targets))
        if as_json:
            sys.stdout.write(json.dumps([s.to_dict() for s in sts], indent=1) + "\n")
            return
        t = Table()
        for col in ("job", "phase", "slurm", "reason", "workers", "batch", "endpoint", "run dir"):
            t.add_column(col)
        for s in sts:
            workers = "; ".join(f"{r}: " + ",".join(f"{n} {st}" for st, n in c.items()) for r, c in s.workers.items())
            p = s.progress
            batch = (f"{p.get('batch_done', 0)}/{p.get('batch_total', '?')} done, {p.get('batch_failed', 0)} failed, "
                     f"{p.get('batch_rows_per_s', 0)} rows/s" if p else "-")
            job = (s.job_id or "-") + (f" (gen {s.generation})" if s.generation else "")
            t.add_row(job, s.phase, s.slurm_state or "-", s.failure or s.reason or "",
                      workers or "-", batch, s.endpoint or "-", s.run_dir or "-")
        print_table(t)

    @app.command()
    @guarded
    def logs(run: Path = typer.Argument(..., help="Run directory."),
             role: Optional[str] = typer.Option(None, help="prefill|decode|both|router|redis"),
             node: Optional[int] = typer.Option(None, help="Node index"),
             follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines (Ctrl-C stops)."),
             lines: int = typer.Option(40, "-n", help="Lines of each log to show first.")):
        """Show the logs of a run's processes (filtered by role or node); a continuous run's current generation."""
        from hpcserve.agent.handover import current_dir
        from hpcserve.plan.model import Plan
        run = current_dir(run)
        plan = Plan.from_json((run / RunPaths.PLAN).read_bytes())
        files = [(p.name, run / p.log) for p in plan.processes
                 if (role is None or role in (p.role, p.kind)) and (node is None or p.node == node)]
        if role is None:
            files += [(f.stem, f) for f in sorted((run / "logs").glob("agent-node*.log"))
                      if node is None or f.stem == f"agent-node{node}"]
        if not files:
            fail(f"no logs match role={role} node={node}")
        pos = {}
        for name, f in files:
            text = f.read_text(errors="replace") if f.exists() else ""
            console.print(f"==> {name} ({f}) <==", markup=False)
            sys.stdout.write("".join(text.splitlines(True)[-lines:]))
            pos[f] = len(text.encode())
        while follow:
            time.sleep(0.5)
            for name, f in files:
                if f.exists() and f.stat().st_size > pos.get(f, 0):
                    with open(f, "rb") as fh:
                        fh.seek(pos.get(f, 0))
                        chunk = fh.read()
                    pos[f] = pos.get(f, 0) + len(chunk)
                    for line in chunk.decode(errors="replace").splitlines():
                        sys.stdout.write(f"[{name}] {line}\n")
                    sys.stdout.flush()

    @app.command()
    @guarded
    def cancel(runs: List[Path] = typer.Argument(..., help="Run dirs."),
               wait: float = typer.Option(60, help="Seconds to drain before a hard scancel.")):
        """Graceful cancel: agents drain, deregister and stop; hard scancel only after --wait seconds."""
        from hpcserve.api import cancel as api_cancel
        from hpcserve.backends.base import Run
        for d in runs:
            run = Run.open(d)
            console.print(f"job {run.job_id}: {api_cancel(run, wait)}", markup=False)
