"""Prometheus metrics. Counts live in plain dicts updated on the hot path (a dict increment, no locks) and
are turned into prometheus-client metric families only when /metrics is scraped. Every name is listed in
docs/metrics.md; per-worker latency names follow SGLang's and Dynamo's (time_to_first_token_seconds,
inter_token_latency_seconds)."""

from __future__ import annotations

import os
import re
from bisect import bisect_left
from time import monotonic
from typing import Iterable

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from hpcserve.router.workers import WorkerSet

_NUMBER = re.compile(rb" *(\d+)")
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0, 600.0)


class RouterMetrics:
    def __init__(self, workers: WorkerSet, share_dir: str | None = None) -> None:
        self.workers = workers
        self.share_dir = share_dir
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # route -> [bucket counts..., +Inf count, sum]
        self.retries: dict[str, int] = {}
        self.redispatches: dict[tuple[str, str], int] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.rejected: dict[str, int] = {}
        self.output_tokens: dict[str, int] = {}   # worker -> generated tokens relayed or answered
        self.ttft: dict[str, list] = {}           # worker -> histogram like ``latency``
        self.itl: dict[str, list] = {}
        self.inflight = 0
        self.queued = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        _observe(self.latency, route, seconds)

    def answer_tokens(self, worker_id: str, body: bytes) -> None:
        """Count the completion tokens a whole (not streamed) answer reports (OpenAI usage or SGLang
        meta_info: the same key)."""
        i = body.rfind(b'"completion_tokens":')
        if i >= 0:
            m = _NUMBER.match(body, i + 20)
            if m is not None:
                self.output_tokens[worker_id] = self.output_tokens.get(worker_id, 0) + int(m.group(1))

    def retry(self, role: str) -> None:
        self.retries[role] = self.retries.get(role, 0) + 1

    def redispatch(self, role: str, reason: str) -> None:
        key = (role, reason)
        self.redispatches[key] = self.redispatches.get(key, 0) + 1

    def upstream_error(self, worker_id: str, kind: str) -> None:
        key = (worker_id, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- several router processes (--processes): each shares a snapshot, /metrics sums them all
    def snapshot(self) -> dict:
        return {
            "requests": [[r, s, n] for (r, s), n in self.requests.items()],
            "latency": self.latency, "retries": self.retries,
            "redispatches": [[r, why, n] for (r, why), n in self.redispatches.items()],
            "upstream_errors": [[w, k, n] for (w, k), n in self.upstream_errors.items()],
            "rejected": self.rejected, "inflight": self.inflight, "queued": self.queued,
            "ejections_total": self.workers.ejections_total,
            "output_tokens": self.output_tokens, "ttft": self.ttft, "itl": self.itl,
            "workers": {w.id: [w.role, w.inflight, 1 if w.circuit == "closed" else 0, w.ejections, w.served,
                               1 if w.rotation else 0] for w in self.workers.all()},
        }

    def write_snapshot(self) -> None:
        if self.share_dir is None:
            return
        path = os.path.join(self.share_dir, f"metrics-{os.getpid()}.json")
        with open(path + ".tmp", "wb") as f:
            f.write(orjson.dumps(self.snapshot()))
        os.replace(path + ".tmp", path)

    def _merged(self) -> dict:
        snap = self.snapshot()
        if self.share_dir is None:
            return snap
        mine = f"metrics-{os.getpid()}.json"
        for name in os.listdir(self.share_dir):
            if name.startswith("metrics-") and name.endswith(".json") and name != mine:
                try:
                    with open(os.path.join(self.share_dir, name), "rb") as f:
                        other = orjson.loads(f.read())
                except (OSError, orjson.JSONDecodeError):
                    continue
                _add(snap, other)
        return snap

    def collect(self) -> Iterable:
        m = self._merged()
        c = CounterMetricFamily("hpcserve_router_requests", "Requests answered, by route and HTTP status.",
                                labels=["route", "status"])
        for route, status, n in sorted(m["requests"]):
            c.add_metric([route, str(status)], n)
        yield c
        yield _histogram("hpcserve_router_request_duration_seconds",
                         "Time from request parsed to response complete (whole stream for streams).",
                         "route", m["latency"])
        yield _histogram("hpcserve_router_time_to_first_token_seconds", "Streamed requests: time from sending "
                         "to a worker to its first response bytes.", "worker", m["ttft"])
        yield _histogram("hpcserve_router_inter_token_latency_seconds", "Streamed requests: gap between "
                         "response chunks of a worker, per token (SSE event).", "worker", m["itl"])
        ot = CounterMetricFamily("hpcserve_router_output_tokens", "Generated tokens relayed from each worker "
                                 "(SSE events of streams, usage.completion_tokens of whole answers).",
                                 labels=["worker"])
        for wid, n in sorted(m["output_tokens"].items()):
            ot.add_metric([wid], n)
        yield ot
        for name, doc, value in (("inflight_requests", "Requests being served now.", m["inflight"]),
                                 ("queued_requests", "Requests waiting for a concurrency slot.", m["queued"])):
            g = GaugeMetricFamily(f"hpcserve_router_{name}", doc)
            g.add_metric([], value)
            yield g
        wi = GaugeMetricFamily("hpcserve_router_worker_inflight", "In-flight requests per worker.",
                               labels=["worker", "role"])
        wh = GaugeMetricFamily("hpcserve_router_worker_healthy", "1 if the worker receives traffic.",
                               labels=["worker", "role"])
        ej = CounterMetricFamily("hpcserve_router_worker_ejections", "Times a worker was ejected by its breaker.",
                                 labels=["worker", "role"])
        wr = CounterMetricFamily("hpcserve_router_worker_requests", "Requests sent to each worker.",
                                 labels=["worker", "role"])
        ro = GaugeMetricFamily("hpcserve_router_worker_in_rotation", "1 unless an operator took the worker out "
                               "of rotation (drain, rotation out).", labels=["worker", "role"])
        for wid, (role, inflight, healthy, ejections, served, rotation) in sorted(m["workers"].items()):
            wi.add_metric([wid, role], inflight)
            wh.add_metric([wid, role], healthy)
            ej.add_metric([wid, role], ejections)
            wr.add_metric([wid, role], served)
            ro.add_metric([wid, role], rotation)
        yield from (wi, wh, ej, wr, ro)
        t = CounterMetricFamily("hpcserve_router_ejections", "Worker ejections since start (all workers).")
        t.add_metric([], m["ejections_total"])
        yield t
        r = CounterMetricFamily("hpcserve_router_retries", "Requests re-sent to another worker after a connect "
                                "failure.", labels=["role"])
        for role, n in sorted(m["retries"].items()):
            r.add_metric([role], n)
        yield r
        rd = CounterMetricFamily("hpcserve_router_redispatches", "Requests sent again to other workers after "
                                 "their worker died or stalled before the client got a byte.",
                                 labels=["role", "reason"])
        for role, reason, n in sorted(m["redispatches"]):
            rd.add_metric([role, reason], n)
        yield rd
        u = CounterMetricFamily("hpcserve_router_upstream_errors", "Failed upstream calls by worker and kind.",
                                labels=["worker", "kind"])
        for wid, kind, n in sorted(m["upstream_errors"]):
            u.add_metric([wid, kind], n)
        yield u
        x = CounterMetricFamily("hpcserve_router_rejected", "Requests refused by limits.", labels=["reason"])
        for reason, n in sorted(m["rejected"].items()):
            x.add_metric([reason], n)
        yield x


def _add(into: dict, other: dict) -> None:
    """Sum another process's snapshot into ``into`` (counters, histograms, gauges; healthy: all must be)."""
    def add_rows(key: str) -> None:
        rows = {tuple(r[:-1]): r[-1] for r in into.get(key, [])}
        for r in other.get(key, []):
            rows[tuple(r[:-1])] = rows.get(tuple(r[:-1]), 0) + r[-1]
        into[key] = [[*k, n] for k, n in rows.items()]

    add_rows("requests")
    add_rows("upstream_errors")
    add_rows("redispatches")
    for key in ("retries", "rejected"):
        for k, n in other.get(key, {}).items():
            into[key][k] = into[key].get(k, 0) + n
    for key in ("latency", "ttft", "itl"):
        for label, counts in other.get(key, {}).items():
            mine = into.setdefault(key, {}).setdefault(label, [0] * len(counts))
            into[key][label] = [a + b for a, b in zip(mine, counts)]
    for wid, n in other.get("output_tokens", {}).items():
        mine = into.setdefault("output_tokens", {})
        mine[wid] = mine.get(wid, 0) + n
    for key in ("inflight", "queued", "ejections_total"):
        into[key] += other.get(key, 0)
    for wid, (role, inflight, healthy, ejections, served, rotation) in other.get("workers", {}).items():
        if wid in into["workers"]:
            r, i, h, e, s, ro = into["workers"][wid]
            into["workers"][wid] = [r, i + inflight, min(h, healthy), e + ejections, s + served, min(ro, rotation)]
        else:
            into["workers"][wid] = [role, inflight, healthy, ejections, served, rotation]


def _observe(store: dict[str, list], label: str, seconds: float) -> None:
    h = store.get(label)
    if h is None:
        h = store[label] = [0] * (len(BUCKETS) + 2) + [0.0]   # bucket counts..., +Inf count, sum
    h[bisect_left(BUCKETS, seconds)] += 1
    h[-1] += seconds


def _histogram(name: str, doc: str, label: str, store: dict[str, list]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=[label])
    for key, counts in sorted(store.items()):
        cum, buckets = 0, []
        for bound, n in zip(BUCKETS + (float("inf"),), counts[:-1]):
            cum += n
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cum))
        h.add_metric([key], buckets, counts[-1])
    return h


class StreamMeter:
    """Wraps a relay's sink: time to first bytes, gaps between chunks per SSE event (token), events."""

    __slots__ = ("m", "wid", "sent_at", "sink", "last")

    def __init__(self, m: RouterMetrics, wid: str, sent_at: float, sink) -> None:
        self.m, self.wid, self.sent_at, self.sink, self.last = m, wid, sent_at, sink, 0.0

    def __call__(self, piece: bytes) -> None:
        now = monotonic()
        n = piece.count(b"data:")
        if n and piece.endswith(b"[DONE]\n\n"):
            n -= 1
        if self.last == 0.0:
            _observe(self.m.ttft, self.wid, now - self.sent_at)
        elif n:
            _observe(self.m.itl, self.wid, (now - self.last) / n)
        self.last = now
        if n:
            tokens = self.m.output_tokens
            tokens[self.wid] = tokens.get(self.wid, 0) + n
        self.sink(piece)
