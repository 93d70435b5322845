"""Rendering: Plan -> job.sbatch text, and the run directory written before anything is submitted.

Output is a pure function of the plan (no timestamps, no absolute run-dir paths), so the same recipe gives
byte-identical files. Files are written atomically: a crash never leaves a half-written plan.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2
import yaml

from hpcserve.cmdline.agent import AgentArgs
from hpcserve.plan.model import Plan
from hpcserve.rundir import RunPaths, atomic_write

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("hpcserve", "templates"),
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
)
_ENV.filters["shq"] = lambda v: shlex.quote(str(v))


def _agent_argv(run_dir: str, sweep: bool = False) -> str:
    """``hpcserve node``'s flags for the batch script; ``run_dir`` is a shell expression ("$RUN_DIR"), so each
    value is double-quoted (expanded by the shell, never split)."""
    args = AgentArgs(sweep=run_dir) if sweep else AgentArgs(plan=f"{run_dir}/{RunPaths.PLAN}", run_dir=run_dir)
    return " ".join(a if a.startswith("--") else f'"{a}"' for a in args.to_argv())


_ENV.globals["agent_argv"] = _agent_argv

RUN_FILES = (RunPaths.RECIPE, RunPaths.PLAN, RunPaths.SCRIPT)


def render_sbatch(plan: Plan, points: list[tuple[str, int]] | None = None) -> str:
    """The batch script. ``points`` (name, nodes) runs a sweep's points one after another in one allocation."""
    return _ENV.get_template("job.sbatch.j2").render(s=plan.slurm, env=sorted(plan.env.items()), python=plan.python,
                                                     points=points)


def resolved_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, default_flow_style=False)


def write_run_dir(run_dir: Path, raw: dict, plan: Plan) -> Path:
    """recipe.resolved.yaml, plan.json, job.sbatch and an empty logs/ folder."""
    run_dir = Path(run_dir)
    (run_dir / RunPaths.LOGS).mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / RunPaths.RECIPE, resolved_yaml(raw))
    atomic_write(run_dir / RunPaths.PLAN, plan.to_json())
    atomic_write(run_dir / RunPaths.SCRIPT, render_sbatch(plan), mode=0o755)
    return run_dir
