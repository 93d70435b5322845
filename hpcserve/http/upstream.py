"""One upstream HTTP/1.1 connection as a callback-driven state machine, and the watchdog for its deadlines.

``send(data, owner)`` writes a request; the response is reported to the owner's ``on_done(conn, error)``
(and ``on_head(conn)`` when asked for); body pieces collect in ``parts`` or go to ``sink`` as they arrive
(a byte relay).
Timeouts (first byte, idle gap, whole request) are enforced by one watchdog per event loop instead of a
timer per request. The pool that owns these connections is in client.py.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import TYPE_CHECKING, Callable, Protocol

from hpcserve.http.parse import MAX_HEAD_BYTES, ChunkedDecoder, HttpParseError
from hpcserve.http.server import (
    H_CONNECTION, H_CONTENT_LENGTH, H_CONTENT_TYPE, H_TRANSFER_ENCODING, find_header, needle, set_nodelay,
)

if TYPE_CHECKING:
    from hpcserve.http.client import UpstreamPool

log = logging.getLogger("hpcserve.http")


class UpstreamError(Exception):
    """The worker could not be reached, broke off, or answered with something that is not HTTP.

    ``retryable``: no byte reached the worker. ``redispatch``: the worker is gone or stalled, so a request
    whose client has received nothing yet may be sent again elsewhere (the router decides what may)."""

    retryable = False
    redispatch = False


class ConnectError(UpstreamError):
    """No connection was made, so no byte of the request reached the worker: safe to try another."""

    retryable = True


class UpstreamTimeout(UpstreamError):
    pass


class ConnectionLost(UpstreamError):
    """The worker closed or reset the connection before its response was complete (it died or restarted)."""

    redispatch = True


class NoAnswer(ConnectionLost):
    """The connection closed before any byte of the answer. On a reused keep-alive socket this is usually the
    server dropping the idle socket just as the request arrived, so whole-request callers try once more."""


class WorkerStalled(UpstreamError):
    """The router gave up on the request because health probes found the worker stalled (no answer at all)."""

    redispatch = True


class Owner(Protocol):
    def on_head(self, conn: "UpstreamConn") -> None: ...
    def on_done(self, conn: "UpstreamConn", err: UpstreamError | None) -> None: ...


_HEAD, _BODY_CL, _BODY_CHUNKED, _BODY_EOF, _DONE, _IDLE = range(6)  # in flight: below _DONE


def content_type(head: bytes, lower: bytes) -> bytes:
    """A response's Content-Type; JSON when it names none (what SGLang's servers send)."""
    return find_header(head, lower, H_CONTENT_TYPE) or b"application/json"


class Reply:
    """A whole response, kept after its connection went back to the pool: status, body, header lookups."""

    __slots__ = ("status", "body", "_head", "_lower")

    def __init__(self, status: int, body: bytes, head: bytes, lower: bytes) -> None:
        self.status = status
        self.body = body
        self._head = head
        self._lower = lower

    def header(self, name: bytes) -> bytes | None:
        return find_header(self._head, self._lower, needle(name))

    @property
    def ctype(self) -> bytes:
        return content_type(self._head, self._lower)


class Watchdog:
    """Checks the deadlines of all in-flight upstream requests of one loop every ``tick`` seconds."""

    _by_loop: dict[int, "Watchdog"] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = 0.1) -> None:
        self.active: set[UpstreamConn] = set()
        self.tick = tick
        self.task = loop.create_task(self._run())

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "Watchdog":
        dog = cls._by_loop.get(id(loop))
        if dog is None or dog.task.done() or dog.task.get_loop() is not loop:
            dog = cls._by_loop[id(loop)] = cls(loop)
        return dog

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            if self.active:
                now = monotonic()
                for conn in [c for c in self.active if c.deadline_passed(now)]:
                    conn.timed_out(now)


class UpstreamConn(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool
        self._active = pool.watchdog.active  # the requests whose deadlines the loop's watchdog checks
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self._state = _IDLE
        self._buf = b""
        self._left = 0
        self._dec: ChunkedDecoder | None = None
        self.owner: Owner | None = None
        self.notify_head = False
        self.status = 0
        self._head_raw = self._head_lower = b""
        self.parts: list[bytes] = []
        self.sink: Callable[[bytes], None] | None = None
        self.relay_to = None  # the client connection a relay writes to (corked per received batch)
        self.receiving = False
        self.corked = None  # who to uncork when this batch of received bytes is handled
        self.sent_at = self.last = 0.0
        self.limits = (0.0, 0.0, 0.0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last = monotonic()
        set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _BODY_EOF:
            self._finish()
        elif self._state == _HEAD and not self._buf:
            self._fail(NoAnswer(f"{self.pool.name} closed the connection without answering"))
        elif self.in_flight:
            self._fail(ConnectionLost(f"{self.pool.name} closed the connection mid-response"))

    @property
    def complete(self) -> bool:
        return self._state == _DONE

    @property
    def in_flight(self) -> bool:
        return self._state < _DONE

    def send(self, data: bytes, owner: Owner, limits: tuple[float, float, float], notify_head: bool = False) -> None:
        """Write a request; ``limits`` are its (first byte, idle gap, whole request) timeouts in seconds.
        The owner's ``on_head`` is called only with ``notify_head`` (a relay needs it; whole answers do not)."""
        # sink, relay_to and the head buffer are already clear: a new connection, or one the pool took back
        self.owner = owner
        self.notify_head = notify_head
        self.status = 0
        self.parts = []
        self._state = _HEAD
        self.sent_at = self.last = monotonic()
        self.limits = limits
        self._active.add(self)
        self.transport.write(data)

    def body(self) -> bytes:
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)  # the common case needs no copy

    def deadline_passed(self, now: float) -> bool:
        first, idle, total = self.limits
        return (now - self.sent_at >= total or (self._state == _HEAD and now - self.sent_at >= first)
                or (self._state != _HEAD and now - self.last >= idle))

    def timed_out(self, now: float) -> None:
        first, idle, total = self.limits
        if self._state == _HEAD and now - self.sent_at >= first:
            why = f"sent no response within the first-byte timeout ({first:g} s)"
        elif now - self.sent_at >= total:
            why = f"did not finish within the request timeout ({total:g} s)"
        else:
            why = f"sent nothing for {idle:g} s (idle timeout)"
        self._fail(UpstreamTimeout(f"{self.pool.name} {why}"))

    def data_received(self, data: bytes) -> None:
        st = self._state
        if st >= _DONE:  # bytes nobody asked for (idle, or after the end): the connection is unusable
            self.close()
            return
        relay = self.relay_to
        if relay is not None:  # a relay's writes of this batch of bytes leave as one
            relay.cork()
            self.corked = relay
        self.receiving = True
        self.last = monotonic()
        try:
            if st == _HEAD:
                if self._buf:
                    data = self._buf + data
                    self._buf = b""
                end = data.find(b"\r\n\r\n")
                while end > 9 and data[9] == 49:  # skip 1xx interim responses (49 is b"1")
                    data = data[end + 4:]
                    end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD_BYTES:
                        raise HttpParseError("response head too large")
                    self._buf = data
                    return
                self._head(data[:end])
                if self.notify_head:
                    self.owner.on_head(self)
                st = self._state
                start = end + 4
                if st == _BODY_CL:
                    left = self._left
                    if left == 0:
                        self._finish()
                        return
                    if left == len(data) - start and self.sink is None:  # the whole body came with the head
                        self.parts.append(data[start:])
                        self._finish()
                        return
                elif st == _DONE:
                    return
                data = data[start:]
                if not data:
                    return
            if st == _BODY_CL:
                if len(data) >= self._left:
                    piece = data[:self._left] if len(data) > self._left else data
                    self._left = 0
                    self._emit(piece)
                    self._finish()
                else:
                    self._left -= len(data)
                    self._emit(data)
            elif st == _BODY_CHUNKED:
                dec = self._dec
                for piece in dec.feed(data):
                    self._emit(piece)
                if dec.done:
                    self._finish()
            elif st == _BODY_EOF:
                self._emit(data)
        except HttpParseError as err:
            self._fail(UpstreamError(f"{self.pool.name} sent malformed HTTP: {err}"))
        except Exception:  # a bug in an owner callback must not leave the client hanging
            log.exception("upstream response handling failed")
            owner, self.owner = self.owner, None
            self._fail(UpstreamError("router error"))
            crashed = getattr(owner, "crashed", None)
            if crashed is not None:
                crashed()
        finally:
            self.receiving = False
            corked = self.corked
            if corked is not None:
                self.corked = None
                corked.uncork()

    @property
    def ctype(self) -> bytes:
        return content_type(self._head_raw, self._head_lower)

    def reply(self) -> Reply:
        """The complete response as a Reply that outlives this connection's reuse."""
        return Reply(self.status, self.body(), self._head_raw, self._head_lower)

    def _head(self, head: bytes) -> None:
        # bytes.find, not ``in``: on CPython the ``in`` operator costs about twice as much here
        code = head[9:12]
        if head[:7] != b"HTTP/1." or not code.isdigit():
            raise HttpParseError("malformed status line")
        self.status = status = int(code)
        lower = head.lower()
        if lower.find(H_CONNECTION) >= 0:
            conn = find_header(lower, lower, H_CONNECTION)
            self.reusable = (b"close" not in conn) if head[7:8] == b"1" else (b"keep-alive" in conn)
        else:
            self.reusable = head[7:8] == b"1"
        self._head_raw, self._head_lower = head, lower
        if status == 204 or status == 304:
            self._state, self._left = _BODY_CL, 0
        elif lower.find(H_TRANSFER_ENCODING) >= 0 and find_header(lower, lower, H_TRANSFER_ENCODING).endswith(
                b"chunked"):
            self._dec = ChunkedDecoder()
            self._state = _BODY_CHUNKED
        else:
            i = lower.find(H_CONTENT_LENGTH)
            if i < 0:
                self._state = _BODY_EOF
                self.reusable = False
            else:
                j = lower.find(b"\r\n", i + 17)
                cl = (lower[i + 17:j] if j > 0 else lower[i + 17:]).strip()
                if not cl.isdigit():
                    raise HttpParseError("invalid Content-Length")
                self._state, self._left = _BODY_CL, int(cl)

    def _emit(self, piece: bytes) -> None:
        if self.sink is not None:
            self.sink(piece)
        else:
            self.parts.append(piece)

    def _finish(self) -> None:
        if self._state == _DONE:
            return
        self._state = _DONE
        self._active.discard(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.on_done(self, None)

    def _fail(self, err: UpstreamError) -> None:
        self._state = _DONE
        self.reusable = False
        self._active.discard(self)
        self.close()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.on_done(self, err)

    def abort(self, reason: str = "request cancelled", err: UpstreamError | None = None) -> None:
        """Drop an in-flight request (the worker sees the disconnect and cancels its work); the owner is
        told (with ``err``, default a plain UpstreamError) unless it detached itself first (``owner = None``)."""
        if self.in_flight:
            self._fail(err or UpstreamError(reason))
        else:
            self.close()

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.reusable = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
