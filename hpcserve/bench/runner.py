"""A benchmark run: for each concurrency level, warm up, measure, judge validity, write the level JSON and
refresh the rollup. ``run_benchmark`` is the API the recipe's benchmark stage and sweeps call."""

from __future__ import annotations

from hpcserve import aio

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hpcserve.bench import loadgen
from hpcserve.bench.results import ROLLUP_NAME, SCHEMA_VERSION, write_level, write_rollup
from hpcserve.bench.stats import LevelMetrics, level_metrics
from hpcserve.bench.validity import (DEFAULT_MAX_ERROR_RATE, RestartCounter, ValidityRules, check_level,
                                     read_restarts)
from hpcserve.bench.workload import BenchError, RequestSpec, load_dataset, random_requests, take


@dataclass
class BenchConfig:
    """Everything one run needs. Either ``isl``+``osl`` (random token ids) or ``dataset`` (JSONL)."""

    url: str
    isl: int | None = None
    osl: int | None = None
    dataset: str | None = None
    concurrency: list[int] = field(default_factory=lambda: [1])
    request_rate: float | None = None      # req/s with Poisson arrivals; None = as fast as slots free up
    num_prompts: int | None = None         # measured requests per level; default 4 x concurrency
    warmup: int = 2                        # per level, not measured
    gpus: int = 1                          # for tok/s per GPU; the caller knows the topology
    api: str = "auto"                      # auto | generate | completions
    model: str | None = None               # completions: model name (default: first of /v1/models)
    seed: int = 0
    timeout_s: float = 600.0
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    force_output_len: bool = True          # ignore_eos + min tokens; short outputs then make a level invalid
    run: str = ""                          # label of this run in the rollup and the plots
    point: dict | str | None = None        # sweep point, recorded with every level
    api_key: str | None = None

    def check(self) -> None:
        """Raise a one-line BenchError for anything the user must fix."""
        if self.dataset is None:
            if self.isl is None or self.osl is None:
                raise BenchError("pass --isl N and --osl N (random prompts) or --dataset FILE.jsonl")
            if self.isl < 1:
                raise BenchError(f"--isl must be >= 1, got {self.isl}")
        elif self.isl is not None:
            raise BenchError("--isl and --dataset exclude each other; the dataset fixes the prompts")
        if self.osl is not None and self.osl < 0:
            raise BenchError(f"--osl must be >= 0, got {self.osl}")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise BenchError(f"--concurrency needs positive integers, got {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise BenchError(f"--request-rate must be > 0 req/s, got {self.request_rate}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise BenchError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.warmup < 0 or self.gpus < 1 or self.timeout_s <= 0:
            raise BenchError("--warmup must be >= 0, --gpus >= 1 and --timeout > 0")
        if not 0 <= self.max_error_rate <= 1:
            raise BenchError(f"--max-error-rate is a fraction in [0, 1], got {self.max_error_rate}")

    def level_size(self, concurrency: int) -> int:
        return self.num_prompts or 4 * concurrency


@dataclass
class LevelOutcome:
    concurrency: int
    request_rate: float | None
    metrics: LevelMetrics
    reasons: list[str]
    path: Path
    timing_warning: str | None = None    # the numbers are not a model's (mock without a timing model)

    @property
    def valid(self) -> bool:
        return not self.reasons


class Progress(Protocol):
    """What the CLI's progress bar implements; the recipe stage may pass None."""

    def level_started(self, name: str, total: int) -> None: ...
    def request_done(self, ok: bool) -> None: ...
    def level_finished(self) -> None: ...


async def run_benchmark(cfg: BenchConfig, out_dir: Path | str, *, restart_counter: RestartCounter | None = None,
                        progress: Progress | None = None) -> list[LevelOutcome]:
    """Run every level of ``cfg`` in order and write ``out_dir/level_c*.json`` and ``out_dir/rollup.csv``.

    ``restart_counter`` returns the registry's total worker restart count (sync or async); a change during
    a level makes it invalid. Raises BenchError for user mistakes, before any request is sent.
    """
    cfg.check()
    out = Path(out_dir)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    target = loadgen.resolve_target(cfg.url, cfg.api, model=cfg.model, force_output_len=cfg.force_output_len,
                                    timeout_s=cfg.timeout_s, headers=headers)
    rows = load_dataset(Path(cfg.dataset), cfg.osl) if cfg.dataset else None
    rules = ValidityRules(max_error_rate=cfg.max_error_rate, require_full_output=cfg.force_output_len)
    outcomes: list[LevelOutcome] = []
    async with loadgen.make_session(max(cfg.concurrency), cfg.timeout_s) as session:
        warning = loadgen.timing_warning(await loadgen.probe_server(session, target))
        if warning and progress is not None and hasattr(progress, "warn"):
            progress.warn(warning)
        if target.api == "completions" and not target.model:
            target = _with_model(target, await loadgen.fetch_model_name(session, target))
        offset = 0
        for c in cfg.concurrency:
            n = cfg.level_size(c)
            # prompt generation can take a second for long ISLs: keep it off the event loop
            warm, specs, offset = await asyncio.to_thread(_level_specs, cfg, rows, c, n, offset)
            if warm:
                await loadgen.run_level(session, target, warm, concurrency=min(c, len(warm)), seed=cfg.seed)
            name = f"c={c}" + (f" @ {cfg.request_rate:g} req/s" if cfg.request_rate else "")
            if progress is not None:
                progress.level_started(name, len(specs))
            before = await read_restarts(restart_counter)
            started = time.time()
            results, duration = await loadgen.run_level(
                session, target, specs, concurrency=c, request_rate=cfg.request_rate, seed=cfg.seed,
                on_result=(lambda r: progress.request_done(r.ok)) if progress is not None else None)
            after = await read_restarts(restart_counter)
            if progress is not None:
                progress.level_finished()
            metrics = level_metrics(results, concurrency=c, duration_s=duration, gpus=cfg.gpus,
                                    request_rate=cfg.request_rate)
            reasons = check_level(results, rules, restarts_before=before, restarts_after=after)
            record = _level_record(cfg, target, c, metrics, reasons, results, started)
            record["timing_warning"] = warning
            path = await asyncio.to_thread(write_level, out, record)
            await asyncio.to_thread(write_rollup, [out], out / ROLLUP_NAME)
            outcomes.append(LevelOutcome(c, cfg.request_rate, metrics, reasons, path, warning))
    return outcomes


def run(cfg: BenchConfig, out_dir: Path | str, **kw) -> list[LevelOutcome]:
    """Synchronous wrapper (own event loop, uvloop when available)."""
    return run_async_main(run_benchmark(cfg, out_dir, **kw))


def run_async_main(coro):
    return aio.run(coro)


def _with_model(target: loadgen.Target, model: str) -> loadgen.Target:
    from dataclasses import replace
    return replace(target, model=model)


def _level_specs(cfg: BenchConfig, rows: list[RequestSpec] | None, c: int, n: int,
                 offset: int) -> tuple[list[RequestSpec], list[RequestSpec], int]:
    """Warm-up and measured requests of one level; random prompts never repeat across levels."""
    if rows is None:
        assert cfg.isl is not None and cfg.osl is not None
        warm = random_requests(cfg.warmup, cfg.isl, cfg.osl, seed=cfg.seed, tag=f"warmup-c{c}")
        return warm, random_requests(n, cfg.isl, cfg.osl, seed=cfg.seed, tag=f"c{c}"), offset
    warm = take(rows, cfg.warmup, offset)
    specs = take(rows, n, offset + cfg.warmup)
    return warm, specs, (offset + cfg.warmup + n) % len(rows)


def _level_record(cfg: BenchConfig, target: loadgen.Target, c: int, metrics: LevelMetrics, reasons: list[str],
                  results: list, started: float) -> dict:
    return {
        "schema": SCHEMA_VERSION, "run": cfg.run, "point": cfg.point, "url": cfg.url, "endpoint": target.endpoint,
        "api": target.api, "model": target.model, "isl": cfg.isl, "osl": cfg.osl, "dataset": cfg.dataset,
        "gpus": cfg.gpus, "concurrency": c, "request_rate": cfg.request_rate, "warmup": cfg.warmup,
        "seed": cfg.seed, "force_output_len": cfg.force_output_len, "max_error_rate": cfg.max_error_rate,
        "started_at": started, "finished_at": time.time(),
        "valid": not reasons, "reasons": reasons, "metrics": metrics.to_dict(),
        "requests": [r.summary() for r in results],
    }
