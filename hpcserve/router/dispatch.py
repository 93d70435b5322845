"""Sending a generation request to workers: one worker (aggregated) or a prefill + decode pair (PD).

Each request is an exchange object driven by the upstream connections' callbacks (no task, no future on
the common path). PD follows SGLang's protocol (docs/design.md, "SGLang PD protocol"): the same JSON body, with
bootstrap_host/port/room added, goes to both servers at once and the decode's answer is returned.
Connections are obtained before any byte is sent, so a connect failure can be retried on another worker;
once a request was written to a prefill it is never sent again (an orphan would wait for a decode).

Re-dispatch: when the worker of a request dies (connection lost) or is ejected as stalled before the
client got any byte, the request is sent again to another worker, at most ``max_redispatch`` times. In PD
mode only a failed decode leads to that, and the retry is a new PD request (fresh bootstrap room, any
prefill the policy picks): the prefill side may see the same text twice, as a new room, never a replay of
a room it holds. A failed prefill is never replayed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from hpcserve.http import (
    ConnectError, HttpConnection, UpstreamConn, UpstreamError, UpstreamTimeout, WorkerStalled, error_body,
)
from hpcserve.router.metrics import RouterMetrics, StreamMeter
from hpcserve.router.policies import Policy
from hpcserve.router.workers import Worker, WorkerSet

log = logging.getLogger("hpcserve.router")


class RouteError(Exception):
    """Answered to the client as a JSON error with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "upstream_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def batch_size(body: dict) -> int | None:
    """Number of prompts in a batch request, None for a single prompt."""
    text = body.get("text")
    if isinstance(text, str):  # the common case of /generate: one prompt
        return None
    if isinstance(text, list):
        return len(text)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return None


def _discard(_: bytes) -> None:
    pass


class Leg:
    """One upstream call of an exchange: the worker, its connection, and whether it is settled."""

    __slots__ = ("w", "conn", "open", "innocent")

    def __init__(self, w: Worker, conn: UpstreamConn | None) -> None:
        self.w = w
        self.conn = conn
        self.open = True
        self.innocent = False  # cancelled because of something else: no blame
        w.inflight += 1
        w.served += 1


class Dispatcher:
    def __init__(self, workers: WorkerSet, metrics: RouterMetrics, policies: dict[str, Policy], *,
                 first_byte_timeout: float, idle_timeout: float, request_timeout: float, max_retries: int = 2,
                 max_redispatch: int = 2, on_finished: Callable[[str, int, float], None] | None = None) -> None:
        self.workers = workers
        self.metrics = metrics
        self.policies = policies
        self.timeouts = (first_byte_timeout, idle_timeout, request_timeout)
        self.max_retries = max_retries
        self.max_redispatch = max_redispatch
        self.on_finished = on_finished or (lambda label, status, t0: None)
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        """Run a re-dispatch that must connect first (a reference is kept until it ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def worker_stalled(self, w: Worker) -> int:
        """Health probes ejected ``w`` as stalled: abort its in-flight requests that can be re-dispatched
        (their exchanges send them elsewhere); the rest (relayed streams, prefill legs) keep waiting, so a
        false alarm never fails a request. Returns how many were moved."""
        moved = 0
        for conn in [c for c in w.pool.watchdog.active if c.pool is w.pool]:
            movable = getattr(conn.owner, "movable", None)
            if movable is not None and movable(conn):
                conn.abort(err=WorkerStalled(f"{w.pool.name} stalled (no answer to health probes)"))
                moved += 1
        if moved:
            log.warning("worker %s stalled: %d request(s) moved to other workers", w.id, moved)
        return moved

    def take(self, role: str, key: str | None, exclude: set[str] | None = None) -> Leg:
        candidates = self.workers.healthy[role]
        if exclude:
            candidates = [w for w in candidates if w.id not in exclude]
        if not candidates:
            raise RouteError(503, f"no healthy {role} worker is available", "no_workers")
        w = self.policies[role].pick(candidates, key)
        return Leg(w, w.pool.take_idle())

    async def connect(self, leg: Leg, role: str, key: str | None) -> Leg:
        """Give ``leg`` a new connection, moving to other workers on connect failures."""
        tried: set[str] = set()
        while True:
            try:
                leg.conn = await leg.w.pool.connect()
                return leg
            except ConnectError as err:
                self.settle(leg, err, kind="connect")
                tried.add(leg.w.id)
                if len(tried) > self.max_retries:
                    raise RouteError(502, f"no {role} worker could be reached: {err}") from None
                self.metrics.retry(role)
                try:
                    leg = self.take(role, key, tried)
                except RouteError:
                    raise RouteError(502, f"no {role} worker could be reached: {err}") from None
                if leg.conn is not None:
                    return leg

    def settle(self, leg: Leg, err: Exception | None, kind: str | None = None) -> None:
        """Book a finished leg once: socket back to the pool (or closed), health outcome, metrics."""
        if not leg.open:
            return
        leg.open = False
        w = leg.w
        w.inflight -= 1
        conn = leg.conn
        status = 0  # of a complete response
        if conn is not None:
            if conn.complete:
                status = conn.status
                if status == 200 and conn.sink is None and w.role != "prefill":
                    self.metrics.answer_tokens(w.id, conn.body())
            w.pool.release(conn)
        if leg.innocent:
            return
        if err is None:
            if status >= 500:
                self.workers.record_failure(w, f"{w.id} answered HTTP {status}")
                self.metrics.upstream_error(w.id, "http_5xx")
            elif status and (w.fails or w.circuit != "closed"):
                self.workers.record_success(w)  # a good answer resets the count of consecutive failures
        elif isinstance(err, WorkerStalled):  # already ejected by the probes; counted, not blamed twice
            self.metrics.upstream_error(w.id, "stalled")
        else:
            self.workers.record_failure(w, str(err))
            self.metrics.upstream_error(w.id, kind or ("timeout" if isinstance(err, UpstreamTimeout) else "io"))

    def unuse(self, leg: Leg) -> None:
        """Give back a leg whose request was never sent (its pooled socket stays usable)."""
        leg.innocent = True
        self.settle(leg, None)

    def cancel(self, leg: Leg, reason: str) -> None:
        if leg.open:
            leg.innocent = True
            if leg.conn is not None:
                leg.conn.owner = None
                leg.conn.abort(reason)
            self.settle(leg, None)


class Exchange:
    """One client request in flight. Subclasses implement ``legs``, ``begin`` and the conn callbacks."""

    __slots__ = ("d", "client", "path", "extra", "stream", "label", "t0", "key", "done", "redispatched", "avoid")

    def __init__(self, d: Dispatcher, client: HttpConnection, path: bytes, extra: bytes, stream: bool,
                 label: str, t0: float, key: str | None) -> None:
        self.d = d
        self.client = client
        self.path = path
        self.extra = extra
        self.stream = stream
        self.label = label
        self.t0 = t0
        self.key = key
        self.done = False
        self.redispatched = 0
        self.avoid: set[str] | None = None  # workers that failed this request (not picked again)

    def finish(self, status: int) -> None:
        if not self.done:
            self.done = True
            self.d.on_finished(self.label, status, self.t0)

    def fail(self, status: int, message: str, kind: str = "upstream_error") -> None:
        client = self.client
        if not client.started:
            client.respond(status, error_body(status, message, kind, self.path), extra=self.extra)
        elif not client.finished:  # mid-stream: SGLang's way of reporting errors inside SSE
            body = error_body(status, message, kind, self.path)
            if self.path[:4] == b"/v1/":  # SGLang wraps the ErrorResponse in "error" inside a stream
                body = b'{"error":%b}' % body
            client.write(b"data: " + body + b"\n\n")
            client.end()
        self.finish(status)

    def upstream_failed(self, err: Exception, prefix: str = "") -> None:
        self.fail(504 if isinstance(err, UpstreamTimeout) else 502, f"{prefix}{err}")

    def relay(self, conn: UpstreamConn, sink: Callable[[bytes], None]) -> None:
        """Stream the worker's response bytes to the client unchanged (re-framed as chunks)."""
        client = self.client
        for leg in self.legs():
            if leg.conn is conn:  # per-worker time to first token, inter-token gaps, tokens
                sink = StreamMeter(self.d.metrics, leg.w.id, conn.sent_at, sink)
                break
        if conn.receiving:  # head and first chunks leave in one write when data_received returns
            client.cork()
            conn.corked = client
        client.start_stream(200, conn.ctype, self.extra)
        for part in conn.parts:
            sink(part)
        conn.parts = []
        conn.sink = sink
        conn.relay_to = client
        client.on_pause = conn.pause_reading
        client.on_resume = conn.resume_reading

    def request(self, leg: Leg, raw: bytes) -> None:
        data = b"POST %b HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b" % (
            self.path, leg.w.pool.host_header, len(raw), self.extra, raw)  # UpstreamPool.request_bytes, inlined
        leg.conn.send(data, self, self.d.timeouts, self.stream)  # only a relay needs on_head

    def legs(self) -> list[Leg]:
        raise NotImplementedError

    def ready(self) -> bool:
        """All legs have a connection (the common case: pooled sockets)."""
        return all(leg.conn is not None for leg in self.legs())

    def begin(self) -> None:
        raise NotImplementedError

    def start(self, take: Callable[[], None]):
        """Pick workers and send, or return a coroutine when a connection must be made first."""
        try:
            take()
        except RouteError as err:
            for leg in self.legs():
                self.d.unuse(leg)
            self.fail(err.status, str(err), err.kind)
            return None
        if self.ready():
            self.client.on_close = self.client_gone
            self.begin()
            return None
        return self._connect_then_begin()

    async def _connect_then_begin(self) -> None:
        try:
            await self.connect_missing()
        except RouteError as err:
            for leg in self.legs():
                self.d.unuse(leg)
            self.fail(err.status, str(err), err.kind)
            return
        except BaseException:
            for leg in self.legs():
                self.d.unuse(leg)
            self.finish(499)
            raise
        if self.client.closed:
            for leg in self.legs():
                self.d.unuse(leg)
            self.finish(499)
            return
        self.client.on_close = self.client_gone
        self.begin()

    async def connect_missing(self) -> None:
        raise NotImplementedError

    # ---- re-dispatch after a worker died or stalled
    def can_move(self) -> bool:
        """Nothing reached the client yet and the re-dispatch budget is not spent."""
        client = self.client
        return (not self.done and not client.started and not client.closed
                and self.redispatched < self.d.max_redispatch)

    def movable(self, conn: UpstreamConn) -> bool:
        """Whether the request on ``conn`` may be re-dispatched if that worker is given up on."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the (settled) legs and per-attempt state before a re-dispatch."""
        raise NotImplementedError

    def redispatch(self, failed: Leg, err: UpstreamError) -> bool:
        """Send the request again to other workers after ``failed`` (settled) died or stalled; False when
        that is not allowed (the caller then reports ``err``)."""
        if not (err.redispatch and self.can_move()):
            return False
        d = self.d
        self.redispatched += 1
        if self.avoid is None:
            self.avoid = set()
        self.avoid.add(failed.w.id)
        d.metrics.redispatch(failed.w.role, "stalled" if isinstance(err, WorkerStalled) else "worker_lost")
        log.warning("re-dispatching a request after %s (attempt %d of %d)", err, self.redispatched,
                    d.max_redispatch)
        self.reset()
        self.client.on_close = None  # until the new legs exist; _connect_then_begin checks ``closed``
        try:
            self.take()
        except RouteError as route_err:
            for leg in self.legs():
                d.unuse(leg)
            self.fail(504 if isinstance(err, UpstreamTimeout) else 502, f"{err} (not re-dispatched: {route_err})")
            return True
        if self.ready():
            self.client.on_close = self.client_gone
            self.begin()
        else:
            d.spawn(self._connect_then_begin())
        return True

    def crashed(self) -> None:
        for leg in self.legs():
            self.d.cancel(leg, "router error")
        if not self.client.started:
            self.client.respond(500, error_body(500, "internal router error", "internal_error", self.path),
                                extra=self.extra)
        else:
            self.client.close()
        self.finish(500)

    def client_gone(self) -> None:
        for leg in self.legs():
            self.d.cancel(leg, "client disconnected")
        self.finish(499)
