"""Sending a generation request to workers: one worker (aggregated) or a prefill + decode pair (PD).

PD follows SGLang's protocol (DESIGN section 4): the same JSON body, with bootstrap_host/port/room added,
goes to both servers at once and the decode's answer is returned. Connections are obtained before any
byte is sent, so a connect failure can be retried on another worker; once a request was written to a
prefill it is never sent again (an orphaned prefill would wait for a decode that never comes).
"""

from __future__ import annotations

import asyncio
import random
from typing import Callable

import orjson

from hpcserve.http import ConnectError, HttpConnection, UpstreamConn, UpstreamError, UpstreamTimeout
from hpcserve.router import logprobs
from hpcserve.router.metrics import RouterMetrics
from hpcserve.router.policies import Policy
from hpcserve.router.workers import Worker, WorkerSet


class RouteError(Exception):
    """Answered to the client as a JSON error with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "upstream_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def error_body(status: int, message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def batch_size(body: dict) -> int | None:
    """Number of prompts in a batch request, None for a single prompt."""
    text = body.get("text")
    if isinstance(text, list):
        return len(text)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return None


def _ctype(conn: UpstreamConn) -> bytes:
    return conn.headers.get(b"content-type", b"application/json")


def _discard(_: bytes) -> None:
    pass


async def first_of(a: asyncio.Future, b: asyncio.Future) -> asyncio.Future:
    """Whichever of two futures finishes first (without wrapping them in tasks)."""
    if a.done():
        return a
    if b.done():
        return b
    waiter = asyncio.get_running_loop().create_future()

    def wake(f: asyncio.Future) -> None:
        if not waiter.done():
            waiter.set_result(f)

    a.add_done_callback(wake)
    b.add_done_callback(wake)
    try:
        return await waiter
    finally:
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)


class Call:
    """One upstream request; ``settle`` (once) returns the socket to the pool and books the outcome."""

    __slots__ = ("disp", "w", "conn", "open", "innocent")

    def __init__(self, disp: "Dispatcher", w: Worker, conn: UpstreamConn) -> None:
        self.disp = disp
        self.w = w
        self.conn = conn
        self.open = True
        self.innocent = False  # aborted because of the other side: no blame

    def outcome(self) -> object:
        """True (healthy), a failure reason, or None (nothing learnt about the worker)."""
        done = self.conn.done
        if not done.done() or self.innocent:
            return None
        err = done.exception()
        if err is not None:
            return str(err)
        return True if self.conn.status < 500 else f"{self.w.id} answered HTTP {self.conn.status}"

    def settle(self, outcome: object = "unset") -> None:
        if not self.open:
            return
        self.open = False
        w = self.w
        w.inflight -= 1
        w.pool.release(self.conn)  # aborts it unless the response is complete
        if outcome == "unset":
            outcome = self.outcome()
        if outcome is True:
            self.disp.workers.record_success(w)
        elif outcome is not None:
            self.disp.workers.record_failure(w, str(outcome))
            err = self.conn.done.exception() if self.conn.done.done() else None
            self.disp.metrics.upstream_error(w.id, "timeout" if isinstance(err, UpstreamTimeout) else
                                             "http_5xx" if err is None else "io")

    def settle_when_done(self) -> None:
        self.conn.done.add_done_callback(lambda _: self.settle())

    def cancel(self, reason: str) -> None:
        self.innocent = True
        self.conn.abort(reason)
        self.settle(None)


class Dispatcher:
    def __init__(self, workers: WorkerSet, metrics: RouterMetrics, policies: dict[str, Policy], *,
                 first_byte_timeout: float, idle_timeout: float, request_timeout: float, max_retries: int = 2) -> None:
        self.workers = workers
        self.metrics = metrics
        self.policies = policies
        self.timeouts = (first_byte_timeout, idle_timeout, request_timeout)
        self.max_retries = max_retries

    async def _acquire(self, role: str, key: str | None) -> Call:
        policy = self.policies[role]
        candidates = self.workers.healthy[role]
        tried: set[str] = set()
        last: ConnectError | None = None
        for attempt in range(self.max_retries + 1):
            if tried:
                candidates = [w for w in self.workers.healthy[role] if w.id not in tried]
            if not candidates:
                break
            w = policy.pick(candidates, key)
            conn = w.pool.take_idle()
            if conn is None:
                try:
                    conn = await w.pool.connect()
                except ConnectError as err:
                    last = err
                    tried.add(w.id)
                    self.workers.record_failure(w, str(err))
                    self.metrics.upstream_error(w.id, "connect")
                    if attempt < self.max_retries:
                        self.metrics.retry(role)
                    continue
            w.inflight += 1
            w.served += 1
            return Call(self, w, conn)
        if last is None:
            raise RouteError(503, f"no healthy {role} worker is available", "no_workers")
        raise RouteError(502, f"no {role} worker could be reached: {last}")

    def _send(self, call: Call, path: bytes, body: bytes, extra: bytes) -> None:
        call.conn.send(call.w.pool.request_bytes(b"POST", path, body, extra), *self.timeouts)

    # ---- responses
    def _fail(self, client: HttpConnection, status: int, message: str, extra: bytes, kind: str = "upstream_error") -> int:
        if not client.started:
            client.respond(status, error_body(status, message, kind), extra=extra)
        elif not client.finished:  # mid-stream: SGLang's way of reporting errors inside SSE
            client.write(b"data: " + error_body(status, message, kind) + b"\n\n")
            client.end()
        return status

    def _upstream_failed(self, client: HttpConnection, call: Call, err: UpstreamError, extra: bytes,
                         prefix: str = "") -> int:
        status = 504 if isinstance(err, UpstreamTimeout) else 502
        return self._fail(client, status, f"{prefix}{err}", extra)

    async def _relay(self, call: Call, client: HttpConnection, extra: bytes,
                     wrap: Callable[[Callable[[bytes], None]], Callable[[bytes], None]] | None = None) -> int:
        """Stream the worker's response bytes to the client unchanged (re-framed as chunks)."""
        conn = call.conn
        status = await conn.head
        if status != 200:
            await conn.done
            client.respond(status, conn.body(), _ctype(conn), extra)
            return status
        client.start_stream(status, _ctype(conn), extra)
        sink = client.write if wrap is None else wrap(client.write)
        for part in conn.parts:
            sink(part)
        conn.parts = []
        conn.sink = sink
        client.on_pause = conn.pause_reading
        client.on_resume = conn.resume_reading
        await conn.done
        if wrap is not None:
            sink.flush()  # type: ignore[attr-defined]
        client.end()
        return status

    # ---- aggregated: one worker
    async def aggregated(self, path: bytes, raw: bytes, key: str | None, stream: bool, extra: bytes,
                         client: HttpConnection) -> int:
        call = await self._acquire("both", key)
        self._send(call, path, raw, extra)
        try:
            if stream:
                return await self._relay(call, client, extra)
            conn = call.conn
            await conn.done
            client.respond(conn.status, conn.body(), _ctype(conn), extra)
            return conn.status
        except UpstreamError as err:
            return self._upstream_failed(client, call, err, extra)
        finally:
            call.settle()

    # ---- PD: a prefill and a decode
    async def pd(self, path: bytes, body: dict, key: str | None, stream: bool, extra: bytes,
                 client: HttpConnection) -> int:
        pre = await self._acquire("prefill", key)
        try:
            dec = await self._acquire("decode", key)
        except BaseException:
            pre.settle(None)  # never sent: the socket goes back to the pool as it was
            raise
        p = pre.w
        n = batch_size(body)
        room = random.getrandbits(63)
        if n is None:
            body["bootstrap_host"] = p.bootstrap_host
            body["bootstrap_port"] = p.bootstrap_port
            body["bootstrap_room"] = room
        else:
            body["bootstrap_host"] = [p.bootstrap_host] * n
            body["bootstrap_port"] = [p.bootstrap_port] * n
            body["bootstrap_room"] = [room + i & 0x7FFF_FFFF_FFFF_FFFF for i in range(n)]
        raw = orjson.dumps(body)
        self._send(pre, path, raw, extra)
        self._send(dec, path, raw, extra)
        want_logprob = body.get("return_logprob") is True
        try:
            if stream:
                return await self._pd_stream(pre, dec, want_logprob, extra, client)
            return await self._pd_whole(pre, dec, want_logprob, extra, client)
        except UpstreamError as err:
            prefill_failed = pre.conn.done.done() and pre.conn.done.exception() is err
            failed, other = (pre, dec) if prefill_failed else (dec, pre)
            if other.open:
                other.cancel(f"{failed.w.role} worker {failed.w.id} failed")
            return self._upstream_failed(client, failed, err, extra,
                                         "prefill failed, decode cancelled: " if prefill_failed else "")
        except asyncio.CancelledError:  # the client went away: stop both servers' work
            pre.cancel("client disconnected")
            dec.cancel("client disconnected")
            raise
        finally:
            if pre.open and pre.conn.done.done():
                pre.settle()
            elif pre.open:  # decode has answered; let the prefill finish on its own time
                pre.settle_when_done()
            dec.settle()

    def _prefill_refused(self, pre: Call, dec: Call, client: HttpConnection, extra: bytes) -> int | None:
        """If the finished prefill failed, cancel the decode and answer; else None."""
        conn = pre.conn
        err = conn.done.exception()
        if err is None and conn.status < 300:
            return None
        dec.cancel(f"prefill {pre.w.id} failed")
        if err is not None:
            raise err
        if conn.status < 500:  # the client's mistake (e.g. validation): pass it through as is
            client.respond(conn.status, conn.body(), _ctype(conn), extra)
            return conn.status
        return self._fail(client, 502, f"prefill worker {pre.w.id} failed with HTTP {conn.status}: "
                          f"{conn.body()[:500].decode(errors='replace')}", extra)

    async def _pd_whole(self, pre: Call, dec: Call, want_logprob: bool, extra: bytes, client: HttpConnection) -> int:
        first = await first_of(pre.conn.done, dec.conn.done)
        prefill_items = None
        if first is pre.conn.done:
            refused = self._prefill_refused(pre, dec, client, extra)
            if refused is not None:
                return refused
            if want_logprob:
                prefill_items = logprobs.parse_prefill(pre.conn.body())
            pre.settle()
            await dec.conn.done
        else:
            dec.conn.done.result()  # raises the decode's error, if any
            if dec.conn.status >= 300 and not pre.conn.done.done():
                pre.cancel(f"decode worker {dec.w.id} answered HTTP {dec.conn.status}")
            if want_logprob and dec.conn.status == 200:
                await pre.conn.done
                refused = self._prefill_refused(pre, dec, client, extra)
                if refused is not None:
                    return refused
                prefill_items = logprobs.parse_prefill(pre.conn.body())
        conn = dec.conn
        body = conn.body()
        if prefill_items and conn.status == 200:
            body = logprobs.merge_body(prefill_items, body)
        client.respond(conn.status, body, _ctype(conn), extra)
        return conn.status

    async def _pd_stream(self, pre: Call, dec: Call, want_logprob: bool, extra: bytes, client: HttpConnection) -> int:
        first = await first_of(pre.conn.done, dec.conn.head)
        wrap = None
        if want_logprob or first is pre.conn.done:
            await pre.conn.done
            refused = self._prefill_refused(pre, dec, client, extra)
            if refused is not None:
                return refused
            if want_logprob:
                items = logprobs.parse_prefill(pre.conn.body())
                wrap = lambda out: logprobs.SseMerger(items, out)  # noqa: E731
            pre.settle()
        else:
            pre.conn.sink = _discard  # the prefill's own stream carries nothing we return

            def prefill_done(_: asyncio.Future) -> None:
                outcome = pre.outcome()
                if outcome is True and pre.conn.status >= 300:
                    outcome = f"{pre.w.id} answered HTTP {pre.conn.status}"
                    pre.settle(None)
                else:
                    pre.settle(outcome)
                if outcome is not True and outcome is not None and dec.open:  # the decode can never get its KV now
                    dec.innocent = True
                    dec.conn.abort(f"prefill worker {pre.w.id} failed: {outcome}")

            pre.conn.done.add_done_callback(prefill_done)
        return await self._relay(dec, client, extra, wrap)
