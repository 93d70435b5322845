"""Upstream HTTP/1.1 client: one keep-alive connection pool per worker, protocol-level response parsing,
timeouts for connect, first byte, idle gaps and the whole request, and a byte sink for zero-copy relays.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from hpcserve.http.parse import (
    MAX_HEAD_BYTES, ChunkedDecoder, HttpParseError, content_length, is_chunked, parse_status_head,
)
from hpcserve.http.server import set_nodelay


class UpstreamError(Exception):
    """The worker could not be reached, broke off, or answered with something that is not HTTP."""

    retryable = False


class ConnectError(UpstreamError):
    """No connection was made, so no byte of the request reached the worker: safe to try another."""

    retryable = True


class UpstreamTimeout(UpstreamError):
    pass


_HEAD, _BODY_CL, _BODY_CHUNKED, _BODY_EOF, _DONE, _IDLE = range(6)


class UpstreamConn(asyncio.Protocol):
    """One pooled connection. Call ``send`` then await ``head`` and/or ``done``; read ``status``,
    ``headers`` and ``body()``, or set ``sink`` to receive body pieces as they arrive."""

    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self._state = _IDLE
        self._buf = b""
        self._left = 0
        self._dec: ChunkedDecoder | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.parts: list[bytes] = []
        self.sink: Callable[[bytes], None] | None = None
        self.head: asyncio.Future | None = None
        self.done: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _BODY_EOF:
            self._finish()
        elif self._state != _IDLE and self._state != _DONE:
            self._fail(UpstreamError(f"{self.pool.name} closed the connection mid-response"))

    def send(self, data: bytes, first_byte_timeout: float, idle_timeout: float, total_timeout: float) -> None:
        loop = self.pool.loop
        self.head = loop.create_future()
        self.done = loop.create_future()
        self.status = 0
        self.headers = {}
        self.parts = []
        self.sink = None
        self.reusable = False
        self._buf = b""
        self._state = _HEAD
        now = time.monotonic()
        self._last = now
        self._first_deadline = now + first_byte_timeout
        self._total_deadline = now + total_timeout
        self._idle = idle_timeout
        self._timer = loop.call_at(loop.time() + min(first_byte_timeout, total_timeout), self._on_timer)
        self.transport.write(data)

    def body(self) -> bytes:
        return b"".join(self.parts)

    def _on_timer(self) -> None:
        self._timer = None
        if self._state in (_DONE, _IDLE):
            return
        now = time.monotonic()
        if now >= self._total_deadline:
            err = "did not finish within the request timeout"
        elif self._state == _HEAD and now >= self._first_deadline:
            err = "sent no response within the first-byte timeout"
        elif self._state != _HEAD and now - self._last >= self._idle:
            err = f"sent nothing for {self._idle:g} s (idle timeout)"
        else:
            nxt = self._total_deadline if self._state == _HEAD else min(self._total_deadline, self._last + self._idle)
            if self._state == _HEAD:
                nxt = min(nxt, self._first_deadline)
            self._timer = self.pool.loop.call_later(max(0.0, nxt - now), self._on_timer)
            return
        self._fail(UpstreamTimeout(f"{self.pool.name} {err}"))

    def data_received(self, data: bytes) -> None:
        st = self._state
        if st == _IDLE or st == _DONE:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        self._last = time.monotonic()
        try:
            if st == _HEAD:
                buf = self._buf + data if self._buf else data
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > MAX_HEAD_BYTES:
                            raise HttpParseError("response head too large")
                        self._buf = buf
                        return
                    status, version, headers = parse_status_head(buf[:end])
                    buf = buf[end + 4:]
                    if status >= 200:
                        break
                self._buf = b""
                self.status, self.headers = status, headers
                conn = headers.get(b"connection", b"").lower()
                self.reusable = (b"close" not in conn) if version == b"HTTP/1.1" else (b"keep-alive" in conn)
                if status in (204, 304):
                    self._state = _BODY_CL
                    self._left = 0
                elif is_chunked(headers):
                    self._dec = ChunkedDecoder()
                    self._state = _BODY_CHUNKED
                else:
                    n = content_length(headers)
                    if n is None:
                        self._state = _BODY_EOF
                        self.reusable = False
                    else:
                        self._state = _BODY_CL
                        self._left = n
                self.head.set_result(status)
                if self._state == _BODY_CL and self._left == 0:
                    self._finish()
                    return
                if self._timer is not None and self._state != _DONE:
                    self._timer.cancel()
                    self._timer = self.pool.loop.call_later(min(self._idle, self._total_deadline - self._last),
                                                            self._on_timer)
                if not buf:
                    return
                data = buf
                st = self._state
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

    def _emit(self, piece: bytes) -> None:
        if self.sink is not None:
            self.sink(piece)
        else:
            self.parts.append(piece)

    def _finish(self) -> None:
        self._state = _DONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done.done():
            self.done.set_result(self.status)

    def _fail(self, err: UpstreamError) -> None:
        self._state = _DONE
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in (self.head, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: a caller may await only one of the two
        self.close()

    def abort(self, reason: str = "request cancelled") -> None:
        """Drop an in-flight request (the worker sees the disconnect and cancels its work)."""
        if self._state not in (_DONE, _IDLE):
            self._fail(UpstreamError(reason))
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


class UpstreamPool:
    """Keep-alive connections to one worker (host, port)."""

    def __init__(self, host: str, port: int, *, name: str | None = None, connect_timeout: float = 5.0,
                 max_idle: int = 256, idle_ttl: float = 4.0) -> None:
        self.host = host
        self.port = port
        self.name = name or f"{host}:{port}"
        self.host_header = f"{host}:{port}".encode()
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        # Below typical server keep-alive timeouts (uvicorn: 5 s), so we rarely reuse a socket the
        # worker is about to close; a request is never resent on another socket after bytes went out.
        self.idle_ttl = idle_ttl
        self.idle: list[UpstreamConn] = []
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def take_idle(self) -> UpstreamConn | None:
        idle = self.idle
        if idle:
            cutoff = time.monotonic() - self.idle_ttl
            while idle:
                c = idle.pop()
                if not c.closed and c.idle_since > cutoff:
                    return c
                c.close()
        return None

    async def connect(self) -> UpstreamConn:
        if self.closed:
            raise ConnectError(f"{self.name} was removed")
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConn(self), self.host, self.port), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"connecting to {self.name} timed out after {self.connect_timeout:g} s") from None
        except OSError as err:
            raise ConnectError(f"cannot connect to {self.name}: {err.strerror or err}") from None
        return conn

    async def acquire(self) -> UpstreamConn:
        return self.take_idle() or await self.connect()

    def release(self, conn: UpstreamConn) -> None:
        """Return a connection whose response is complete (or that was never used); else close it."""
        if conn._state == _IDLE:
            conn.reusable = True
        elif conn._state != _DONE:
            conn.abort()
            return
        if conn.reusable and not conn.closed and not self.closed and len(self.idle) < self.max_idle:
            conn._state = _IDLE
            conn.sink = None
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self.closed = True
        for c in self.idle:
            c.close()
        self.idle.clear()

    def request_bytes(self, method: bytes, path: bytes, body: bytes = b"", extra: bytes = b"",
                      content_type: bytes = b"application/json") -> bytes:
        if method == b"GET" and not body:
            return b"GET %b HTTP/1.1\r\nhost: %b\r\n%b\r\n" % (path, self.host_header, extra)
        return b"%b %b HTTP/1.1\r\nhost: %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n%b\r\n%b" % (
            method, path, self.host_header, content_type, len(body), extra, body)

    async def fetch(self, method: bytes, path: bytes, body: bytes = b"", *, timeout: float = 10.0,
                    extra: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
        """One whole request/response (probes, admin calls). Raises UpstreamError."""
        conn = await self.acquire()
        try:
            conn.send(self.request_bytes(method, path, body, extra), timeout, timeout, timeout)
            await conn.done
        except BaseException:
            conn.abort()
            raise
        self.release(conn)
        return conn.status, conn.headers, conn.body()
