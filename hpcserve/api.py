"""The Python API the CLI is built on: load -> plan -> run dir (and, in later modules, submit/run)."""

from __future__ import annotations

from pathlib import Path

from hpcserve.plan.build import plan
from hpcserve.plan.model import Plan
from hpcserve.recipe.load import LoadedRecipe, load_recipe, point_name
from hpcserve.render import atomic_write, write_run_dir


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
