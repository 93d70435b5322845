"""When a level's numbers must not be trusted: each rule returns a reason, and any reason makes it INVALID.

A level with a reason is a failure, not a data point: the report leaves it out and the CLI exits non-zero.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, Union

from hpcserve.bench.stats import RequestResult

DEFAULT_MAX_ERROR_RATE = 0.05

# Returns the registry's total worker restart count (sync or async); compared before/after a level.
RestartCounter = Callable[[], Union[int, Awaitable[int]]]


@dataclass(frozen=True)
class ValidityRules:
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    require_full_output: bool = True    # ignore_eos was forced, so every request must reach its length


def check_level(results: Sequence[RequestResult], rules: ValidityRules = ValidityRules(), *,
                restarts_before: int | None = None, restarts_after: int | None = None) -> list[str]:
    """All reasons this level is invalid; an empty list means valid."""
    reasons: list[str] = []
    n = len(results)
    if n == 0:
        return ["no requests were measured"]
    failed = [r for r in results if not r.ok]
    good = [r for r in results if r.ok]
    if len(failed) / n > rules.max_error_rate:
        reasons.append(f"error rate {len(failed) / n:.0%} above {rules.max_error_rate:.0%} "
                       f"({len(failed)} of {n} failed; first: {_first_error(failed)})")
    if good and sum(r.output_tokens for r in good) == 0:
        reasons.append(f"zero output tokens from {len(good)} completed requests")
    elif rules.require_full_output:
        short = [r for r in good if r.requested_tokens is not None and r.output_tokens < r.requested_tokens]
        if short:
            worst = min(short, key=lambda r: r.output_tokens)
            reasons.append(f"{len(short)} of {len(good)} requests returned fewer tokens than requested "
                           f"(as few as {worst.output_tokens} of {worst.requested_tokens})")
    if restarts_before is not None and restarts_after is not None and restarts_after != restarts_before:
        reasons.append(f"worker restart during the level (registry restart count {restarts_before} -> "
                       f"{restarts_after})")
    return reasons


def _first_error(failed: Sequence[RequestResult]) -> str:
    msg = failed[0].error if failed else ""
    return (msg[:160] + "...") if len(msg) > 160 else (msg or "unknown error")


async def read_restarts(counter: RestartCounter | None) -> int | None:
    """Call the caller's counter, sync or async; None when there is no counter."""
    if counter is None:
        return None
    value = counter()
    if inspect.isawaitable(value):
        value = await value
    return int(value)


def registry_restart_counter(redis: Any, run_id: str) -> RestartCounter:
    """A counter over the run's worker registry: the sum of every worker's ``restarts``.

    ``redis`` is a redis.asyncio client; dead workers stay in the sum so a replacement still counts.
    """
    from hpcserve.registry import load_workers

    async def count() -> int:
        workers = await load_workers(redis, run_id, require_heartbeat=False)
        return sum(w.restarts for w in workers.values())

    return count
