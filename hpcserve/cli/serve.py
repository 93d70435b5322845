"""`hpcserve up`: run a recipe on this machine in the foreground."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import List, Optional

import typer

from hpcserve.cli.common import console, err_console, guarded


def drain_grace(run_dir: Path) -> float:
    """Seconds the agents get after SIGTERM: timeouts.drain for open streams, then stopping the processes."""
    from hpcserve.plan.model import Plan
    from hpcserve.rundir import RunPaths
    try:
        return Plan.from_json((RunPaths(run_dir) / RunPaths.PLAN).read_bytes()).drain_timeout + 30.0
    except (OSError, ValueError):
        return 60.0


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def up(recipe: Path = typer.Argument(..., help="Recipe file."),
           set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a.b=value."),
           run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME-TIME)."),
           timeout: Optional[float] = typer.Option(None, help="Seconds to wait for readiness.")):
        """Run the recipe here (local backend): prints the endpoint when ready; Ctrl-C stops everything."""
        from hpcserve.api import up as api_up
        from hpcserve.cli.progress import ReadinessProgress
        t0 = time.monotonic()
        progress = ReadinessProgress()
        try:
            run, backend = api_up(recipe, set_ or [], run_dir, timeout, tick=progress.tick)
        finally:
            progress.close()
        stop = {"sig": False}

        def on_signal(signum, frame):
            stop["sig"] = True
        # before the endpoint is printed: a Ctrl-C right after it must drain, not interrupt with processes left
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            ep = run.endpoint
            console.print(f"run dir   {run.run_dir}", markup=False)
            console.print(f"endpoint  {ep['url']}   (ready in {time.monotonic() - t0:.1f}s; Ctrl-C stops)",
                          markup=False)
            console.print(f"try       curl -s {ep['url']}/v1/models", markup=False)
            while not stop["sig"]:
                gone = backend.gone()
                if gone:
                    err_console.print(f"error: {gone}", markup=False)
                    break
                time.sleep(0.2)
        finally:
            codes = backend.stop(grace=drain_grace(run.run_dir))
            console.print(f"stopped (agent exit codes {codes})", markup=False)
        if not stop["sig"]:
            raise typer.Exit(1)
