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
