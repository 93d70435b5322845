"""`hpcserve bench URL|RUN_DIR ...` and `hpcserve report RUN... -o DIR` (the load generator and plots)."""

from __future__ import annotations

import typer

PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def register(app: typer.Typer) -> None:
    @app.command(context_settings=PASSTHROUGH)
    def bench(ctx: typer.Context):
        """Serving benchmark: `hpcserve bench URL|RUN_DIR --isl N --osl N --concurrency 1,8,64 -o results/`."""
        from hpcserve.bench import main
        raise typer.Exit(main(list(ctx.args)))

    @app.command(context_settings=PASSTHROUGH)
    def report(ctx: typer.Context):
        """Plots from benchmark results: `hpcserve report RUN_OR_RESULTS... -o report/`."""
        from hpcserve.bench import main
        raise typer.Exit(main(["report", *ctx.args]))
