"""Upstream HTTP/1.1 client: keep-alive connection pools, one per worker, over ``UpstreamConn``.

``take_idle``/``connect`` hand out connections, ``release`` takes them back after a complete response,
``exchange``/``fetch`` wrap a whole request for coroutine callers (health probes, admin calls, the batch
driver).
"""

from __future__ import annotations

import asyncio
import time

from hpcserve.http.upstream import (  # re-exported: callers import the errors from here or hpcserve.http
    _IDLE, ConnectError, ConnectionLost, NoAnswer, Reply, UpstreamConn, UpstreamError, UpstreamTimeout,
    Watchdog, WorkerStalled,
)

__all__ = ["ConnectError", "ConnectionLost", "NoAnswer", "Reply", "UpstreamConn", "UpstreamError", "UpstreamPool",
           "UpstreamTimeout", "WorkerStalled"]


class _FutureOwner:
    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future) -> None:
        self.fut = fut

    def on_head(self, conn: UpstreamConn) -> None:
        pass

    def on_done(self, conn: UpstreamConn, err: UpstreamError | None) -> None:
        if not self.fut.done():
            if err is None:
                self.fut.set_result(conn.status)
            else:
                self.fut.set_exception(err)


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
        self.watchdog = Watchdog.of(self.loop)

    def take_idle(self) -> UpstreamConn | None:
        idle = self.idle
        if idle:
            cutoff = time.monotonic() - self.idle_ttl
            while idle:
                c = idle.pop()
                if not c.closed and c.last > cutoff:  # last byte sent or received: idle since then
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

    def release(self, conn: UpstreamConn) -> None:
        """Return a connection whose response is complete (or that was never used); else close it."""
        if conn.in_flight:
            conn.owner = None
            conn.abort()
            return
        if conn.reusable and not conn.closed and not self.closed and len(self.idle) < self.max_idle:
            conn._state = _IDLE
            conn.sink = conn.relay_to = None  # send() relies on these being clear
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

    async def exchange(self, method: bytes, path: bytes, body: bytes = b"", *, timeout: float = 10.0,
                       extra: bytes = b"") -> Reply:
        """One whole request and its response; ``timeout`` bounds the wait for the first byte, any gap and the
        whole. A reused socket that closes without answering is tried once more on a new socket (the server
        had dropped it); any other failure raises an UpstreamError (ConnectError when nothing was sent)."""
        data = self.request_bytes(method, path, body, extra)
        conn = self.take_idle()
        try:
            return await self._exchange(conn or await self.connect(), data, timeout)
        except NoAnswer:
            if conn is None:
                raise
            return await self._exchange(await self.connect(), data, timeout)

    async def _exchange(self, conn: UpstreamConn, data: bytes, timeout: float) -> Reply:
        fut = self.loop.create_future()
        conn.send(data, _FutureOwner(fut), (timeout, timeout, timeout))
        try:
            await fut
        except BaseException:  # includes cancellation: the server sees the disconnect
            conn.owner = None
            conn.abort()
            raise
        reply = conn.reply()
        self.release(conn)
        return reply

    async def fetch(self, method: bytes, path: bytes, body: bytes = b"", *, timeout: float = 10.0,
                    extra: bytes = b"") -> tuple[int, bytes, bytes]:
        """``exchange`` for callers that need (status, content type, body)."""
        reply = await self.exchange(method, path, body, timeout=timeout, extra=extra)
        return reply.status, reply.ctype, reply.body
