"""`hpcserve bench URL|RUN_DIR ...` and `hpcserve report RUN... -o DIR` (the load generator and plots).

Typer like every other verb; the options map one to one onto ``python -m hpcserve.bench`` (the recipe's
benchmark stage runs that module), which does the work.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import typer

from hpcserve.cli.common import guarded


def register(app: typer.Typer) -> None:
    from hpcserve.bench.validity import DEFAULT_MAX_ERROR_RATE

    @app.command()
    @guarded
    def bench(target: str = typer.Argument(..., metavar="URL|RUN_DIR",
                                           help="Router or engine base URL (http://host:port), its /generate or "
                                                "/v1/completions URL, or a ready run directory."),
              isl: Optional[int] = typer.Option(None, help="Input tokens per request (random token ids)."),
              osl: Optional[int] = typer.Option(None, help="Output tokens per request (forced)."),
              dataset: Optional[str] = typer.Option(None, help="JSONL with 'prompt' or 'input_ids' per line."),
              concurrency: str = typer.Option("1", help="Concurrency levels, e.g. 1,8,64."),
              request_rate: Optional[float] = typer.Option(None, help="Poisson arrivals at R req/s."),
              num_prompts: Optional[int] = typer.Option(None, help="Measured requests per level "
                                                                   "(default 4 x concurrency)."),
              warmup: int = typer.Option(2, help="Unmeasured requests before each level."),
              gpus: Optional[int] = typer.Option(None, help="GPUs behind the URL, for tok/s per GPU "
                                                            "(default: the run's plan, else 1)."),
              api: str = typer.Option("auto", help="auto, generate (SGLang /generate) or completions "
                                                   "(OpenAI /v1/completions)."),
              model: Optional[str] = typer.Option(None, help="Model name for /v1/completions "
                                                             "(default: first of /v1/models)."),
              api_key_env: Optional[str] = typer.Option(None, help="Environment variable holding a bearer key."),
              seed: int = typer.Option(0, help="Seed for prompts and arrivals."),
              timeout: float = typer.Option(600.0, help="Per-request timeout in seconds."),
              max_error_rate: float = typer.Option(DEFAULT_MAX_ERROR_RATE,
                                                   help="A level with more failed requests is invalid."),
              allow_short_output: bool = typer.Option(False, "--allow-short-output",
                                                      help="Do not force OSL; short outputs stay valid."),
              label: str = typer.Option("", help="Run name in the rollup and plots."),
              output: Optional[str] = typer.Option(None, "-o", "--output",
                                                   help="Output directory (default RUN_DIR/bench or "
                                                        "bench-results).")):
        """Serving benchmark: streaming requests per concurrency level; TTFT/ITL/TPOT/e2e, tok/s per GPU and
        per user. Exit 0 all levels valid, 1 a level invalid, 2 a mistake or an unreachable URL (one line)."""
        from hpcserve.bench.cli import _bench, parse_levels
        args = SimpleNamespace(target=target, isl=isl, osl=osl, dataset=dataset,
                               concurrency=parse_levels(concurrency), request_rate=request_rate,
                               num_prompts=num_prompts, warmup=warmup, gpus=gpus, api=api, model=model,
                               api_key_env=api_key_env, seed=seed, timeout=timeout, max_error_rate=max_error_rate,
                               allow_short_output=allow_short_output, label=label, output=output)
        raise typer.Exit(_bench(args))

    @app.command()
    @guarded
    def report(dirs: List[Path] = typer.Argument(..., help="Bench output dirs (or run dirs) with level_c*.json."),
               output: Path = typer.Option(Path("report"), "-o", "--output", help="Directory for the PNGs.")):
        """Plots from benchmark results: throughput vs TPOT and vs speed per user, TTFT by level, Pareto
        frontiers per workload (ISL/OSL)."""
        from hpcserve.bench.cli import _report
        raise typer.Exit(_report(SimpleNamespace(dirs=[str(d) for d in dirs], output=str(output))))
