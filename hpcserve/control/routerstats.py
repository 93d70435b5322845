"""Per-worker numbers from the router's /metrics text: counters, in-flight, and TTFT / ITL quantiles from
the histograms (interpolated inside a bucket, as Prometheus' histogram_quantile does). `hpcserve top` shows
these; rates are counter differences between two scrapes."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

HISTOGRAMS = {"hpcserve_router_time_to_first_token_seconds": "ttft",
              "hpcserve_router_inter_token_latency_seconds": "itl"}
VALUES = {"hpcserve_router_worker_inflight": "inflight", "hpcserve_router_worker_requests_total": "requests",
          "hpcserve_router_worker_in_rotation": "rotation", "hpcserve_router_worker_healthy": "healthy"}


@dataclass
class WorkerStats:
    inflight: int = 0
    requests: int = 0
    tokens: int = 0
    rotation: int = 1
    healthy: int = 1
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)   # ttft/itl -> (le, cumulative)

    def quantile(self, which: str, q: float) -> float | None:
        return quantile(self.buckets.get(which, []), q)


@dataclass
class RouterStats:
    workers: dict[str, WorkerStats]
    inflight: int = 0
    queued: int = 0


def parse(text: str) -> RouterStats:
    workers: dict[str, WorkerStats] = {}
    out = RouterStats(workers)

    def of(labels: dict) -> WorkerStats:
        return workers.setdefault(labels["worker"], WorkerStats())
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in VALUES:
                setattr(of(s.labels), VALUES[s.name], int(s.value))
            elif s.name == "hpcserve_router_output_tokens_total":
                of(s.labels).tokens = int(s.value)
            elif s.name.endswith("_bucket") and s.name[:-7] in HISTOGRAMS:
                le = float("inf") if s.labels["le"] == "+Inf" else float(s.labels["le"])
                of(s.labels).buckets.setdefault(HISTOGRAMS[s.name[:-7]], []).append((le, s.value))
            elif s.name == "hpcserve_router_inflight_requests":
                out.inflight = int(s.value)
            elif s.name == "hpcserve_router_queued_requests":
                out.queued = int(s.value)
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a cumulative histogram; None when it holds no observation."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le          # beyond the last finite bound: report that bound
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def merged(stats: RouterStats) -> WorkerStats:
    """All workers as one: counters added, histogram buckets added bound by bound."""
    total = WorkerStats()
    for w in stats.workers.values():
        total.inflight += w.inflight
        total.requests += w.requests
        total.tokens += w.tokens
        for which, bs in w.buckets.items():
            acc = dict(total.buckets.get(which, []))
            for le, c in bs:
                acc[le] = acc.get(le, 0.0) + c
            total.buckets[which] = sorted(acc.items())
    return total
