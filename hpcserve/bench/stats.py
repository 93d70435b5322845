"""Per-request measurements and the per-level numbers derived from them (pure, no I/O).

Definitions (times in seconds inside the code, milliseconds in reports):
  TTFT   time from sending the request to the first streamed chunk that carries >= 1 output token
  ITL    gap between consecutive token-carrying chunks; a chunk with k new tokens contributes k gaps of
         gap/k (so a server streaming every few tokens is not penalised per chunk)
  TPOT   (e2e - TTFT) / (output_tokens - 1), per request; undefined for requests with < 2 tokens
  tok/s per user   median over requests of 1/TPOT (the decode speed one user sees)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "itl", "tpot", "e2e")


@dataclass
class RequestResult:
    """What one request measured. ``error`` is empty when the request succeeded."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0          # sent (random ids) or reported by the server
    requested_tokens: int | None = None
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    start: float = 0.0              # perf_counter when sent
    itl: list[float] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens the server found in its KV cache, when it says

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def summary(self) -> dict:
        """A compact record for the level JSON (ITL lists are summarised, not stored)."""
        out = asdict(self)
        out.pop("itl")
        out.pop("start")
        out["tpot"] = self.tpot
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def distribution_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 in milliseconds; None when there is no sample (JSON has no NaN)."""
    vals = [v * 1000.0 for v in values_s]
    if not vals:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    out: dict[str, float | None] = {"mean": sum(vals) / len(vals)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(vals, q)
    return out


@dataclass
class LevelMetrics:
    concurrency: int
    request_rate: float | None
    gpus: int
    num_requests: int
    completed: int
    errors: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    req_per_s: float
    input_tok_per_s: float
    output_tok_per_s: float
    output_tok_per_s_per_gpu: float
    tok_per_s_per_user: float | None
    ttft_ms: dict
    itl_ms: dict
    tpot_ms: dict
    e2e_ms: dict
    cached_token_ratio: float | None = None  # cached / prompt tokens, when the server reports cached tokens

    @property
    def error_rate(self) -> float:
        return self.errors / self.num_requests if self.num_requests else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error_rate"] = self.error_rate
        return d


def level_metrics(results: Sequence[RequestResult], *, concurrency: int, duration_s: float, gpus: int = 1,
                  request_rate: float | None = None) -> LevelMetrics:
    """Aggregate one level. ``duration_s`` is wall time from the first send to the last completion."""
    good = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in good)
    in_tok = sum(r.prompt_tokens for r in good)
    dur = duration_s if duration_s > 0 else math.inf
    tpots = [t for t in (r.tpot for r in good) if t is not None and t > 0]
    per_user = percentile([1.0 / t for t in tpots], 50) if tpots else None
    return LevelMetrics(
        concurrency=concurrency, request_rate=request_rate, gpus=gpus,
        num_requests=len(results), completed=len(good), errors=len(results) - len(good),
        duration_s=duration_s, input_tokens=in_tok, output_tokens=out_tok,
        req_per_s=len(good) / dur, input_tok_per_s=in_tok / dur, output_tok_per_s=out_tok / dur,
        output_tok_per_s_per_gpu=out_tok / dur / max(gpus, 1), tok_per_s_per_user=per_user,
        ttft_ms=distribution_ms(r.ttft for r in good if r.output_tokens > 0),
        itl_ms=distribution_ms(x for r in good for x in r.itl),
        tpot_ms=distribution_ms(tpots),
        e2e_ms=distribution_ms(r.e2e for r in good),
        cached_token_ratio=(sum(r.cached_tokens or 0 for r in good) / in_tok
                            if in_tok and any(r.cached_tokens is not None for r in good) else None),
    )
