"""The `hpcserve` command line: thin verbs over the Python API; every user mistake is one line + exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from hpcserve.cli.common import ClusterOpt, SetOpt, console, err_console, guarded, show_plan_table
from hpcserve.rundir import RunPaths


class OneLineErrors(typer.Typer):
    """Usage mistakes (missing option, bad value) as one line `error: ... (see hpcserve VERB --help)` and exit
    2, like every other mistake, instead of click's framed panel."""

    def __call__(self, *args, **kwargs):
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except Exception as e:   # click's ClickException family: a message and an exit code
            if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
                raise
            if type(e).__name__ == "NoArgsIsHelpError":   # bare `hpcserve`: the help, as before
                print(e.ctx.get_help() if getattr(e, "ctx", None) else e.format_message(), file=sys.stderr)
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            print(f"error: {e.format_message()}{hint}", file=sys.stderr)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = OneLineErrors(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                    help="Recipes -> Slurm jobs -> SGLang prefill/decode worker groups behind one router.")
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}



@app.command()
@guarded
def validate(recipes: List[Path] = typer.Argument(..., help="Recipe files (each one is checked)."),
             set_: Optional[List[str]] = SetOpt, cluster: Optional[str] = ClusterOpt,
             engine_check: bool = typer.Option(False, "--engine-check",
                                               help="Also parse every SGLang command line with SGLang's parser.")):
    """Validate recipes (schema, topology, ports); optionally check engine flags with SGLang itself. Every file
    is checked: one line per file (ok, or error naming the fix); exit 2 when any failed."""
    from hpcserve.api import load_plans
    from hpcserve.engines.check import check_plan_engine_args, version_note
    from hpcserve.errors import HpcserveError
    failed = 0
    for path in recipes:
        try:
            plans = load_plans(path, set_ or [], cluster)
            _notes(plans)
            if engine_check:
                err_console.print(version_note(plans[0][0].recipe.engine.version, plans[0][1].engine), markup=False)
                for _, plan in plans:
                    problems = check_plan_engine_args(plan)
                    if problems:
                        raise HpcserveError(f"{path}: {problems[0]}")
        except HpcserveError as e:
            failed += 1
            err_console.print(f"error: {e}", markup=False)
            continue
        pts = f" ({len(plans)} sweep points)" if len(plans) > 1 else ""
        console.print(f"ok {path}{pts}", markup=False)
    if failed:
        raise typer.Exit(2)


@app.command()
@guarded
def render(recipe: Path = typer.Argument(..., help="Recipe file."),
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the run dir here."),
           set_: Optional[List[str]] = SetOpt, cluster: Optional[str] = ClusterOpt,
           as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON document (a sweep: "
                                                              "every point's plan in one document).")):
    """Dry run: print the batch script submit would submit and a node table, or write the run directory with
    -o (a sweep that runs in one allocation: its top-level job.sbatch too)."""
    from hpcserve.api import load_plans, sweep_allocation, sweep_script, write_plans
    from hpcserve.recipe.load import point_name
    from hpcserve.render import render_sbatch
    plans = load_plans(recipe, set_ or [], cluster)
    _notes(plans)
    if out is not None:
        dirs = write_plans(plans, out)
        top = Path(out) / RunPaths.SCRIPT
        if len(dirs) > 1 and top.exists():
            console.print(f"wrote {top}  (submit runs the whole sweep in this one job)", markup=False)
        for d in dirs:
            console.print(f"wrote {d}", markup=False)
        return
    sweep = len(plans) > 1 or bool(plans[0][0].point)
    if as_json:
        if not sweep:
            sys.stdout.write(plans[0][1].to_json().decode())
            return
        import json
        alloc = sweep_allocation([p for _, p in plans])
        doc = {"one_allocation": alloc is not None,
               "points": [{"dir": point_name(i, lr.point), "point": lr.point, "plan": json.loads(p.to_json())}
                          for i, (lr, p) in enumerate(plans)]}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    alloc = sweep_allocation([p for _, p in plans]) if sweep else None
    if alloc is not None:
        console.print("# the whole sweep runs in one allocation, point after point: the job submit submits",
                      markup=False)
        sys.stdout.write(sweep_script(alloc, [(Path(point_name(i, lr.point)), p)
                                              for i, (lr, p) in enumerate(plans)]))
    for loaded, plan in plans:
        if loaded.point:
            own = "" if alloc is not None else " (its own job)"
            console.print(f"# sweep point {loaded.point}{own}", markup=False)
        if alloc is None:
            sys.stdout.write(render_sbatch(plan))
        show_plan_table(plan)


def _notes(plans) -> None:
    """What the recipe leaves to defaults that differ from SGLang's, and sbatch directives the sbatch here does
    not know (hpcserve.doctor.directives): on stderr, so --json output stays one document."""
    from hpcserve.doctor.directives import unknown_directives
    loaded, plan = plans[0]
    for line in list(loaded.notes) + list(getattr(plan, "notes", [])) + unknown_directives(plan, getattr(loaded.recipe.cluster,
                                                                                    "slurm_version", None)):
        err_console.print(f"note: {line}", markup=False)


@app.command(context_settings=PASSTHROUGH)
def node(ctx: typer.Context):
    """Node agent (runs on every node of a job): `hpcserve node --plan plan.json --run-dir DIR`."""
    from hpcserve.agent.main import main
    raise typer.Exit(main(list(ctx.args)))


@app.command("mock-engine", context_settings=PASSTHROUGH)
def mock_engine(ctx: typer.Context):
    """The SGLang-compatible mock engine (same flags as sglang.launch_server, plus --mock-*)."""
    from hpcserve.mock import main
    raise typer.Exit(main(list(ctx.args)))


@app.command(context_settings=PASSTHROUGH)
def router(ctx: typer.Context):
    """The head-node router (see docs/router.md)."""
    from hpcserve.router import main
    raise typer.Exit(main(list(ctx.args)))


def _register_more() -> None:
    """Verbs that live in their own modules add themselves here. A module that fails to import is an
    error, not a verb quietly missing from --help."""
    from hpcserve.cli import batch, bench, doctor, serve, slurm, top
    for module in (serve, slurm, batch, bench, doctor, top):
        module.register(app)


_register_more()

if __name__ == "__main__":
    app()
