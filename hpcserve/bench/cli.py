"""``python -m hpcserve.bench URL|RUN_DIR ...`` (run levels) and ``python -m hpcserve.bench report DIR... -o OUT``.

Exit codes: 0 all levels valid; 1 some level invalid (reasons printed); 2 a user mistake (one line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from hpcserve.bench.rundir import RunInfo, read_run, run_restart_counter
from hpcserve.bench.runner import BenchConfig, LevelOutcome, run_async_main, run_benchmark
from hpcserve.bench.validity import DEFAULT_MAX_ERROR_RATE
from hpcserve.errors import HpcserveError

EXIT_INVALID = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise HpcserveError(f"{self.prog}: {message} (see --help)")


def parse_levels(text: str) -> list[int]:
    """--concurrency 1,8,64 -> [1, 8, 64]; a one-line HpcserveError naming the option otherwise."""
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise HpcserveError(f"--concurrency: expected comma-separated integers like 1,8,64, got {text!r}") from None
    if not vals:
        raise HpcserveError("--concurrency: expected at least one level, e.g. 1,8,64")
    return vals


def _int_list(text: str) -> list[int]:
    try:
        return parse_levels(text)
    except HpcserveError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--concurrency: ")) from None


def bench_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hpcserve.bench",
                description="Serving benchmark: streaming requests per concurrency level; TTFT/ITL/TPOT/e2e, "
                            "throughput per GPU and per user; invalid levels fail the run.")
    p.add_argument("target", metavar="URL|RUN_DIR",
                   help="router or engine base URL (http://host:port), its /generate or /v1/completions URL, or a "
                        "ready run directory (endpoint, GPU count and restart tracking come from its files)")
    p.add_argument("--isl", type=int, help="input tokens per request (random token ids, exact length)")
    p.add_argument("--osl", type=int, help="output tokens per request (forced with ignore_eos + min tokens)")
    p.add_argument("--dataset", help="JSONL with 'prompt' or 'input_ids' and optional 'output_len' per line")
    p.add_argument("--concurrency", type=_int_list, default=[1], help="levels, e.g. 1,8,64 (default 1)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals at R req/s, capped by the concurrency")
    p.add_argument("--num-prompts", type=int, help="measured requests per level (default 4 x concurrency)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each level (default 2)")
    p.add_argument("--gpus", type=int, help="GPUs behind the URL, for tok/s per GPU (default: the run's plan, "
                                           "else 1)")
    p.add_argument("--api", choices=["auto", "generate", "completions"], default="auto",
                   help="SGLang /generate (default) or OpenAI /v1/completions")
    p.add_argument("--model", help="model name for /v1/completions (default: first of /v1/models)")
    p.add_argument("--api-key-env", help="environment variable holding a bearer API key")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)")
    p.add_argument("--max-error-rate", type=float, default=DEFAULT_MAX_ERROR_RATE,
                   help=f"a level with more failed requests is invalid (default {DEFAULT_MAX_ERROR_RATE})")
    p.add_argument("--allow-short-output", action="store_true",
                   help="do not force OSL (no ignore_eos/min tokens); short outputs then stay valid")
    p.add_argument("--label", default="", help="run name in the rollup and plots (default: the run's name, "
                                               "else the output dir name)")
    p.add_argument("-o", "--output", help="output directory (default: RUN_DIR/bench, else bench-results)")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hpcserve.bench report", description="PNG plots over benchmark result dirs.")
    p.add_argument("dirs", nargs="+", help="bench output dirs (or run dirs) holding level_c*.json files")
    p.add_argument("-o", "--output", default="report", help="directory for the PNGs (default report)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if argv and argv[0] == "report":
            return _report(report_parser().parse_args(argv[1:]))
        return _bench(bench_parser().parse_args(argv))
    except HpcserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; levels finished so far are in the output directory", file=sys.stderr)
        return 130


def _report(args: argparse.Namespace) -> int:
    from hpcserve.bench.report import make_report
    for path in make_report(args.dirs, args.output):
        print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise HpcserveError(f"environment variable {args.api_key_env} is empty; export the API key first")
    info: RunInfo | None = None
    url = args.target
    if "://" not in url:
        if not Path(url).is_dir():
            raise HpcserveError(f"{url} is neither a URL (http://host:port) nor a run directory")
        info = read_run(url)
        url = info.url
    out = Path(args.output) if args.output else (info.run_dir / "bench" if info else Path("bench-results"))
    gpus = args.gpus if args.gpus is not None else (info.gpus if info else 1)
    label = args.label or (info.name if info else out.resolve().name)
    cfg = BenchConfig(url=url, isl=args.isl, osl=args.osl, dataset=args.dataset,
                      concurrency=args.concurrency, request_rate=args.request_rate, num_prompts=args.num_prompts,
                      warmup=args.warmup, gpus=gpus, model=args.model, seed=args.seed,
                      api=info.api if info and args.api == "auto" else args.api,   # a Dynamo run: completions
                      timeout_s=args.timeout, max_error_rate=args.max_error_rate,
                      force_output_len=not args.allow_short_output, run=label,
                      point=info.point if info else None, api_key=api_key)
    progress = _RichProgress() if sys.stderr.isatty() else None
    try:
        outcomes = run_async_main(_bench_async(cfg, out, info, progress))
    finally:
        if progress is not None:
            progress.close()
    warning = next((o.timing_warning for o in outcomes if o.timing_warning), None)
    if warning:   # before and after the table: a number that looks good must not hide it
        print(f"WARNING: {warning}", file=sys.stderr)
    print_summary(outcomes)
    print(f"results: {out}/ (level_c*.json, rollup.csv)")
    if warning:
        print("WARNING: these numbers are not a model's (mock engine, time-scale 0); see above", file=sys.stderr)
    bad = [o for o in outcomes if not o.valid]
    for o in bad:
        print(f"INVALID c={o.concurrency}: {'; '.join(o.reasons)}", file=sys.stderr)
    return EXIT_INVALID if bad else 0


async def _bench_async(cfg: BenchConfig, out: Path, info: RunInfo | None, progress) -> list[LevelOutcome]:
    if info is None:
        return await run_benchmark(cfg, out, progress=progress)
    async with run_restart_counter(info) as counter:
        return await run_benchmark(cfg, out, restart_counter=counter, progress=progress)


class _RichProgress:
    """One progress bar per level on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
                           console=Console(stderr=True), transient=False)
        self._p.start()
        self._task = None
        self._errors = 0

    def level_started(self, name: str, total: int) -> None:
        self._errors = 0
        self._task = self._p.add_task(name, total=total, errors=0)

    def request_done(self, ok: bool) -> None:
        if not ok:
            self._errors += 1
        self._p.update(self._task, advance=1, errors=self._errors)

    def level_finished(self) -> None:
        self._task = None

    def close(self) -> None:
        self._p.stop()


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_summary(outcomes: Sequence[LevelOutcome]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="hpcserve bench", show_lines=False)
    cached = any(o.metrics.cached_token_ratio is not None for o in outcomes)  # only when the server reports it
    for col in ("level", "req/s", "out tok/s", "tok/s/GPU", "tok/s/user", "TTFT p50/p99 ms",
                "ITL p50/p99 ms", "TPOT p50 ms", "e2e p50 ms", *(("cached",) if cached else ()), "errors", "status"):
        t.add_column(col, justify="right" if col not in ("level", "status") else "left")
    for o in outcomes:
        m = o.metrics
        level = f"c={o.concurrency}" + (f"@{o.request_rate:g}/s" if o.request_rate else "")
        errors = f"{m.errors}/{m.num_requests}"
        if not o.valid:
            # an invalid level shows no numbers: they are not results
            t.add_row(level, *["-"] * (9 if cached else 8), errors, "[red]INVALID[/red]")
            continue
        t.add_row(level, _f(m.req_per_s, 2), _f(m.output_tok_per_s), _f(m.output_tok_per_s_per_gpu),
                  _f(m.tok_per_s_per_user), f"{_f(m.ttft_ms['p50'])}/{_f(m.ttft_ms['p99'])}",
                  f"{_f(m.itl_ms['p50'], 2)}/{_f(m.itl_ms['p99'], 2)}", _f(m.tpot_ms["p50"], 2),
                  _f(m.e2e_ms["p50"]),
                  *((f"{m.cached_token_ratio:.1%}" if m.cached_token_ratio is not None else "-",) if cached else ()),
                  errors, "[green]ok[/green]")
    # piped: every value in full (a terminal: at least 140 columns, wider when the terminal is)
    Console(width=max(140, Console().width) if sys.stdout.isatty() else 100_000).print(t)
