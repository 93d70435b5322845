"""The Python API the CLI is built on: load -> plan -> run dir (and, in later modules, submit/run)."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from hpcserve.plan.build import plan
from hpcserve.plan.model import Plan
from hpcserve.recipe.load import LoadedRecipe, load_recipe, point_name
from hpcserve.render import atomic_write, write_run_dir

if TYPE_CHECKING:
    from hpcserve.backends.base import Run


def load_plans(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
               python: str | None = None) -> list[tuple[LoadedRecipe, Plan]]:
    """Every sweep point of a recipe, validated and planned."""
    return [(lr, plan(lr.recipe, lr.point, python=python)) for lr in load_recipe(recipe, list(overrides), cluster)]


def write_plans(plans: list[tuple[LoadedRecipe, Plan]], out: Path) -> list[Path]:
    """One run dir, or for a sweep one sub-dir per point plus sweep.json."""
    out = Path(out)
    if len(plans) == 1 and not plans[0][0].point:
        return [write_run_dir(out, plans[0][0].raw, plans[0][1])]
    import orjson
    dirs = []
    for i, (lr, p) in enumerate(plans):
        dirs.append(write_run_dir(out / point_name(i, lr.point), lr.raw, p))
    out.mkdir(parents=True, exist_ok=True)
    index = [{"dir": d.name, "point": lr.point} for d, (lr, _) in zip(dirs, plans)]
    atomic_write(out / "sweep.json", orjson.dumps(index, option=orjson.OPT_INDENT_2) + b"\n")
    return dirs


def prepare_run(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
                run_dir: str | Path | None = None) -> list[tuple[Path, Plan]]:
    """Validate, plan and write the run dir(s) BEFORE anything is started or submitted."""
    from hpcserve.backends.base import new_run_dir
    plans = load_plans(recipe, overrides, cluster)
    out = Path(run_dir).resolve() if run_dir else new_run_dir(plans[0][1].name)
    return list(zip(write_plans(plans, out), (p for _, p in plans)))


def up(recipe: str | Path, overrides: list[str] = (), run_dir: str | Path | None = None, timeout: float | None = None):
    """Start a deployment on this machine; returns (Run, LocalBackend) once ready (raises on failure)."""
    from hpcserve.backends.local import LocalBackend
    from hpcserve.errors import HpcserveError
    [(lr, _)] = load_plans(recipe, overrides)[:1] or [(None, None)]
    extra = ["cluster.backend=local"]
    if lr.recipe.cluster.address == "auto":
        extra.append("cluster.address=127.0.0.1")
    [(d, plan)] = prepare_run(recipe, list(overrides) + extra, run_dir=run_dir)[:1]
    backend = LocalBackend()
    run = backend.submit(d, plan)
    try:
        run.wait_ready(timeout or plan.startup_timeout + 10, alive=backend.gone)
    except (HpcserveError, KeyboardInterrupt):
        backend.stop()
        raise
    return run, backend


def submit(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
           run_dir: str | Path | None = None, sbatch_args: list[str] = ()) -> list["Run"]:
    """Write the run dir(s), then sbatch each plan (a sweep: one job per point). Returns the Runs."""
    from hpcserve.backends.slurm import SlurmBackend
    backend = SlurmBackend()
    return [backend.submit(d, plan, extra_args=list(sbatch_args))
            for d, plan in prepare_run(recipe, overrides, cluster, run_dir)]


def wait_ready(run: "Run", timeout: float) -> dict:
    """Block until the run's router is ready. A job that ended, or waits in the queue for something that
    will never happen (bad partition, account, QOS), raises with Slurm's reason and is cancelled."""
    from hpcserve.backends.slurm import SlurmBackend
    from hpcserve.status import HOPELESS_PENDING, collect

    def gone() -> str | None:
        [st] = collect([str(run.run_dir)])
        if st.phase == "blocked":
            SlurmBackend.kill(run.job_id)
            return f"job {run.job_id} can never start ({st.reason}); cancelled it. Fix the cluster profile"
        if st.slurm_state and st.slurm_state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") \
                and st.reason not in HOPELESS_PENDING:
            return f"job {run.job_id} ended: {st.phase} ({st.slurm_state})"
        return None
    return run.wait_ready(timeout, alive=gone, poll=1.0)


def cancel(run: "Run", wait: float = 60.0) -> str:
    """Graceful: SIGTERM to the job's agents (they drain, deregister, stop children); hard scancel after
    ``wait`` seconds. Returns the final Slurm state."""
    import time as _t

    from hpcserve.backends.slurm import SlurmBackend, query_jobs
    from hpcserve.render import atomic_write
    atomic_write(run.run_dir / "cancel.json", '{"requested": true}\n')
    info = query_jobs([run.job_id])[run.job_id]
    if info.state in ("PENDING", "REQUEUED"):
        SlurmBackend.kill(run.job_id)
    elif info.state in ("RUNNING", "CONFIGURING"):
        SlurmBackend.signal(run.job_id, "TERM")
    deadline = _t.monotonic() + wait
    while _t.monotonic() < deadline:
        info = query_jobs([run.job_id])[run.job_id]
        if info.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            return info.state
        _t.sleep(1.0)
    SlurmBackend.kill(run.job_id)
    return query_jobs([run.job_id])[run.job_id].state
