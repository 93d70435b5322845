"""Prometheus metrics. Counts live in plain dicts updated on the hot path (a dict increment, no locks) and
are turned into prometheus-client metric families only when /metrics is scraped."""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from hpcserve.router.workers import WorkerSet

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0, 600.0)


class RouterMetrics:
    def __init__(self, workers: WorkerSet) -> None:
        self.workers = workers
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # route -> [bucket counts..., +Inf count, sum]
        self.retries: dict[str, int] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.rejected: dict[str, int] = {}
        self.inflight = 0
        self.queued = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = [0] * (len(BUCKETS) + 2) + [0.0]
        h[bisect_left(BUCKETS, seconds)] += 1
        h[-1] += seconds

    def retry(self, role: str) -> None:
        self.retries[role] = self.retries.get(role, 0) + 1

    def upstream_error(self, worker_id: str, kind: str) -> None:
        key = (worker_id, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterable:
        c = CounterMetricFamily("hpcserve_router_requests", "Requests answered, by route and HTTP status.",
                                labels=["route", "status"])
        for (route, status), n in sorted(self.requests.items()):
            c.add_metric([route, str(status)], n)
        yield c
        h = HistogramMetricFamily("hpcserve_router_request_duration_seconds",
                                  "Time from request parsed to response complete (whole stream for streams).",
                                  labels=["route"])
        for route, counts in sorted(self.latency.items()):
            cum, buckets = 0, []
            for bound, n in zip(BUCKETS + (float("inf"),), counts[:-1]):
                cum += n
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cum))
            h.add_metric([route], buckets, counts[-1])
        yield h
        g = GaugeMetricFamily("hpcserve_router_inflight_requests", "Requests being served now.")
        g.add_metric([], self.inflight)
        yield g
        g = GaugeMetricFamily("hpcserve_router_queued_requests", "Requests waiting for a concurrency slot.")
        g.add_metric([], self.queued)
        yield g
        wi = GaugeMetricFamily("hpcserve_router_worker_inflight", "In-flight requests per worker.",
                               labels=["worker", "role"])
        wh = GaugeMetricFamily("hpcserve_router_worker_healthy", "1 if the worker receives traffic.",
                               labels=["worker", "role"])
        ej = CounterMetricFamily("hpcserve_router_worker_ejections", "Times a worker was ejected by its breaker.",
                                 labels=["worker", "role"])
        for w in self.workers.all():
            wi.add_metric([w.id, w.role], w.inflight)
            wh.add_metric([w.id, w.role], 1 if w.circuit == "closed" else 0)
            ej.add_metric([w.id, w.role], w.ejections)
        yield wi
        yield wh
        yield ej
        t = CounterMetricFamily("hpcserve_router_ejections", "Worker ejections since start (all workers).")
        t.add_metric([], self.workers.ejections_total)
        yield t
        r = CounterMetricFamily("hpcserve_router_retries", "Requests re-sent to another worker after a connect "
                                "failure.", labels=["role"])
        for role, n in sorted(self.retries.items()):
            r.add_metric([role], n)
        yield r
        u = CounterMetricFamily("hpcserve_router_upstream_errors", "Failed upstream calls by worker and kind.",
                                labels=["worker", "kind"])
        for (wid, kind), n in sorted(self.upstream_errors.items()):
            u.add_metric([wid, kind], n)
        yield u
        x = CounterMetricFamily("hpcserve_router_rejected", "Requests refused by limits.", labels=["reason"])
        for reason, n in sorted(self.rejected.items()):
            x.add_metric([reason], n)
        yield x
