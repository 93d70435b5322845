"""The router's in-memory view of its workers: address, role, in-flight count and a circuit breaker each.

Static workers (command line) and registry workers (Redis) live in one WorkerSet; per-role lists of the
workers that may receive traffic are rebuilt only when something changes, so the hot path never filters.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable
from urllib.parse import urlsplit

from hpcserve.http import UpstreamPool
from hpcserve.registry import WorkerRecord

log = logging.getLogger("hpcserve.router")

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's default; used only when a prefill record lacks one (never send null)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"worker URL {url!r} must look like http://HOST:PORT")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"worker URL {url!r} has an invalid port") from None
    return parts.hostname, port


class Worker:
    """One engine server. ``circuit`` is closed (serving), open (ejected) or half_open (recovering)."""

    __slots__ = ("id", "role", "url", "host", "port", "bootstrap_host", "bootstrap_port", "source", "pool",
                 "inflight", "fails", "oks", "circuit", "ejections", "last_error", "last_change", "served",
                 "fail_round", "last_ejection", "rotation")

    def __init__(self, wid: str, role: str, url: str, *, bootstrap_port: int | None = None,
                 bootstrap_host: str | None = None, source: str = "static", connect_timeout: float = 5.0) -> None:
        self.id = wid
        self.role = role
        self.url = url.rstrip("/")
        self.host, self.port = split_url(url)
        self.bootstrap_host = bootstrap_host or self.host
        self.bootstrap_port = bootstrap_port
        self.source = source
        self.pool = UpstreamPool(self.host, self.port, name=f"{role} worker {self.id}", connect_timeout=connect_timeout)
        self.inflight = 0
        self.fails = 0
        self.oks = 0
        self.circuit = CLOSED
        self.ejections = 0
        self.served = 0
        self.last_error = ""
        self.last_change = time.time()
        self.fail_round: int | None = None  # probe round in which the current run of failures began
        self.last_ejection: dict | None = None
        self.rotation = True   # False: an operator took it out (draining or rotated out); it gets nothing new

    def same_address(self, other: "Worker") -> bool:
        return (self.url, self.role, self.bootstrap_host, self.bootstrap_port) == (
            other.url, other.role, other.bootstrap_host, other.bootstrap_port)

    def view(self) -> dict:
        return {"id": self.id, "role": self.role, "url": self.url, "bootstrap_host": self.bootstrap_host,
                "bootstrap_port": self.bootstrap_port, "source": self.source, "healthy": self.circuit == CLOSED,
                "circuit": self.circuit, "inflight": self.inflight, "served": self.served,
                "consecutive_failures": self.fails, "ejections": self.ejections, "last_error": self.last_error,
                "first_failed_round": self.fail_round, "last_ejection": self.last_ejection,
                "rotation": self.rotation}


class WorkerSet:
    """All workers, the per-role serving lists, and the breaker rules (eject after N, readmit after M)."""

    def __init__(self, mode: str, *, eject_after: int = 3, readmit_after: int = 2, connect_timeout: float = 5.0) -> None:
        self.mode = mode
        self.roles = ("prefill", "decode") if mode == "pd" else ("both",)
        self.eject_after = max(1, eject_after)
        self.readmit_after = max(1, readmit_after)
        self.connect_timeout = connect_timeout
        self.workers: dict[str, Worker] = {}
        self.healthy: dict[str, list[Worker]] = {r: [] for r in self.roles}
        self.ejections_total = 0
        self.probe_round = 0  # advanced by the health checker: ejection timing is recorded in rounds
        self.on_removed: list[Callable[[Worker], None]] = []
        self._warned_bootstrap: set[str] = set()

    # ---- membership
    def add_static(self, role: str, url: str, bootstrap_port: int | None = None) -> Worker:
        n = sum(1 for w in self.workers.values() if w.role == role and w.source == "static")
        w = Worker(f"{role}-{n}", role, url, bootstrap_port=bootstrap_port, connect_timeout=self.connect_timeout)
        self._put(w)
        return w

    def _put(self, w: Worker) -> None:
        old = self.workers.get(w.id)
        if old is not None:
            self._drop(old)
        self.workers[w.id] = w
        self._rebuild()
        log.info("worker %s added: %s %s", w.id, w.role, w.url)

    def _drop(self, w: Worker) -> None:
        self.workers.pop(w.id, None)
        w.pool.close()  # idle sockets now; in-flight ones close when their request ends
        for cb in self.on_removed:
            cb(w)

    def remove(self, wid: str) -> None:
        w = self.workers.get(wid)
        if w is not None:
            self._drop(w)
            self._rebuild()
            log.info("worker %s removed", wid)

    def worker_from_record(self, rec: WorkerRecord) -> Worker | None:
        """A registry record that may serve in this mode, else None (wrong role, not ready, heartbeat gone).
        A draining worker stays (out of rotation) so its in-flight requests stay counted."""
        role = rec.role
        if rec.state not in ("ready", "draining") or role not in self.roles:
            return None
        port = rec.bootstrap_port
        if role == "prefill" and port is None:
            port = DEFAULT_BOOTSTRAP_PORT
            if rec.id not in self._warned_bootstrap:
                self._warned_bootstrap.add(rec.id)
                log.warning("prefill %s has no bootstrap_port in the registry; using %d", rec.id, port)
        try:
            w = Worker(rec.id, role, rec.url, bootstrap_port=port, bootstrap_host=rec.host or None,
                       source="registry", connect_timeout=self.connect_timeout)
        except ValueError as err:
            log.warning("ignoring registry worker %s: %s", rec.id, err)
            return None
        w.rotation = rec.state == "ready" and rec.rotation
        return w

    def apply_record(self, wid: str, rec: WorkerRecord | None) -> None:
        """Follow one registry entry: add, update or remove the worker it describes."""
        new = self.worker_from_record(rec) if rec is not None else None
        old = self.workers.get(wid)
        if old is not None and old.source != "registry":
            return  # a static worker with the same id wins
        if new is None:
            if old is not None:
                self.remove(wid)
        elif old is None or not old.same_address(new):
            self._put(new)
        elif old.rotation != new.rotation:
            old.rotation = new.rotation
            self._rebuild()
            log.info("worker %s %s rotation", wid, "back in" if new.rotation else "out of")

    def sync_registry(self, records: dict[str, WorkerRecord]) -> None:
        """A full rescan: make the registry-sourced workers exactly the eligible records."""
        for wid, rec in records.items():
            self.apply_record(wid, rec)
        for wid in [w.id for w in self.workers.values() if w.source == "registry" and w.id not in records]:
            self.remove(wid)

    def _rebuild(self) -> None:
        healthy: dict[str, list[Worker]] = {r: [] for r in self.roles}
        for w in self.workers.values():
            if w.circuit == CLOSED and w.rotation and w.role in healthy:
                healthy[w.role].append(w)
        self.healthy = healthy

    def all(self) -> Iterable[Worker]:
        return list(self.workers.values())

    def missing_roles(self) -> list[str]:
        return [r for r in self.roles if not self.healthy[r]]

    # ---- health outcomes (passive from requests, active from probes)
    def record_success(self, w: Worker) -> None:
        if w.circuit == CLOSED:
            w.fails = 0
            w.fail_round = None
            return
        w.oks += 1
        if w.oks >= self.readmit_after:
            self._set(w, CLOSED, f"readmitted after {w.oks} successes")
            w.fails = w.oks = 0
            w.fail_round = None
        elif w.circuit == OPEN:
            self._set(w, HALF_OPEN, "first success after ejection")

    def record_failure(self, w: Worker, reason: str, stalled: bool = False, probe_round: int | None = None) -> bool:
        """Count a failure; True when it ejected the worker. ``stalled`` (no answer to a probe within the
        probe timeout) ejects at once: a stall is not a blip that N tries would filter out. ``probe_round``:
        the round a failed probe was sent in (default: now)."""
        w.last_error = reason[:300]
        w.oks = 0
        w.fails += 1
        if w.fail_round is None:
            w.fail_round = self.probe_round if probe_round is None else probe_round
        if w.circuit == CLOSED and (stalled or w.fails >= self.eject_after):
            w.ejections += 1
            self.ejections_total += 1
            w.last_ejection = {"round": self.probe_round, "first_failed_round": w.fail_round,
                               "stalled": stalled, "reason": w.last_error}
            why = "stalled" if stalled else f"ejected after {w.fails} consecutive failures"
            self._set(w, OPEN, f"{why}: {reason}")
            return True
        if w.circuit == HALF_OPEN:
            self._set(w, OPEN, f"failed while recovering: {reason}")
        return False

    def _set(self, w: Worker, circuit: str, why: str) -> None:
        w.circuit = circuit
        w.last_change = time.time()
        if w.id in self.workers:
            self._rebuild()
        (log.warning if circuit == OPEN else log.info)("worker %s (%s) %s", w.id, w.url, why)

    def close(self) -> None:
        for w in list(self.workers.values()):
            w.pool.close()
