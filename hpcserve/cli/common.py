"""CLI helpers: one-line errors, the plan table."""

from __future__ import annotations

import functools
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from hpcserve.errors import HpcserveError

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

SetOpt = typer.Option(None, "--set", help="Override a recipe key: a.b=value (repeatable).")
ClusterOpt = typer.Option(None, "--cluster", help="Cluster profile YAML replacing the recipe's cluster.")


def table_console() -> Console:
    """Tables fit the terminal; piped or redirected they print every value in full (no '...')."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(file=sys.stdout, highlight=False, width=100_000)


def print_table(table: Table) -> None:
    table_console().print(table)


def fail(msg: str, code: int = 2) -> NoReturn:
    err_console.print(f"error: {msg}", markup=False)
    raise typer.Exit(code)


def guarded(fn):
    """User mistakes (HpcserveError) become one line on stderr and a non-zero exit, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HpcserveError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)
    return wrapper


def show_plan_table(plan) -> None:
    t = Table(title=f"{plan.name}: {plan.num_nodes} nodes, {plan.mode}, engine {plan.engine}")
    for col in ("node", "process", "role", "gpus", "ports"):
        t.add_column(col)
    for p in plan.processes:
        gpus = ",".join(map(str, p.gpus)) or "-"
        ports = " ".join(f"{k}={v}" for k, v in sorted(p.ports.items())) or "-"
        t.add_row(str(p.node), p.name, p.role or p.kind, gpus, ports)
    print_table(t)
