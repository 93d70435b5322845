"""A lean HTTP/1.1 server on asyncio.Protocol: keep-alive, Content-Length and chunked request bodies,
whole or chunked (streamed) responses, write backpressure, and cancellation of the handler when the client
goes away. Requests on one connection are served one at a time (bytes of a pipelined request wait).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Awaitable, Callable

from hpcserve.http.parse import (
    LAST_CHUNK, MAX_HEAD_BYTES, REASONS, ChunkedDecoder, HttpParseError, content_length, encode_chunk,
    is_chunked, parse_request_head,
)

log = logging.getLogger("hpcserve.http")

_HEAD, _BODY_CL, _BODY_CHUNKED = range(3)


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "version", "keep_alive")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: dict[bytes, bytes], body: bytes):
        self.method = method
        path, _, query = target.partition(b"?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.version = version
        conn = headers.get(b"connection", b"").lower()
        self.keep_alive = (b"close" not in conn) if version == b"HTTP/1.1" else (b"keep-alive" in conn)


Handler = Callable[[Request, "HttpConnection"], Awaitable[None]]


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class HttpConnection(asyncio.Protocol):
    """One client connection. The handler answers through ``respond`` or ``start_stream``/``write``/``end``."""

    def __init__(self, server: "HttpServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_active = time.monotonic()
        self._buf = b""
        self._state = _HEAD
        self._head: tuple | None = None
        self._need = 0
        self._chunks: ChunkedDecoder | None = None
        self._parts: list[bytes] = []
        self._task: asyncio.Task | None = None
        self._keep_alive = True
        self._chunked_out = True
        self.started = False  # response head written
        self.finished = False  # response complete
        self._paused = False
        self._drain: asyncio.Future | None = None
        # A relay reading from an upstream socket registers these to follow our write backpressure.
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    # ---- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: cancel the upstream work
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        self._paused = True
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        self._paused = False
        if self.on_resume is not None:
            self.on_resume()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self._buf = self._buf + data if self._buf else data
        if self._task is not None:  # a request is being served; hold the bytes until it is done
            if len(self._buf) > MAX_HEAD_BYTES + self.server.max_body_bytes:
                self.transport.pause_reading()
            return
        try:
            self._process()
        except HttpParseError as err:
            self._fail(err.status, str(err))

    # ---- request parsing
    def _process(self) -> None:
        while not self.closed and self._task is None:
            buf = self._buf
            if self._state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise HttpParseError("request head too large", 431)
                    return
                if end == 0:  # stray CRLF between requests
                    self._buf = buf[4:]
                    continue
                method, target, version, headers = parse_request_head(buf[:end])
                self._head = (method, target, version, headers)
                self._buf = buf[end + 4:]
                limit = self.server.max_body_bytes
                if is_chunked(headers):
                    self._chunks = ChunkedDecoder(limit)
                    self._parts = []
                    self._state = _BODY_CHUNKED
                else:
                    n = content_length(headers) or 0
                    if n > limit:
                        raise HttpParseError(f"request body of {n} bytes exceeds the limit of {limit}", 413)
                    self._need = n
                    self._state = _BODY_CL
                if headers.get(b"expect", b"").lower() == b"100-continue":
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif self._state == _BODY_CL:
                if len(buf) < self._need:
                    return
                body, self._buf = buf[:self._need], buf[self._need:]
                self._dispatch(body)
            else:
                dec = self._chunks
                self._parts.extend(dec.feed(buf))
                if not dec.done:
                    self._buf = b""
                    return
                self._buf = dec.tail
                self._dispatch(b"".join(self._parts))

    def _dispatch(self, body: bytes) -> None:
        method, target, version, headers = self._head
        self._state = _HEAD
        self._chunks = None
        self._parts = []
        req = Request(method, target, version, headers, body)
        self._keep_alive = req.keep_alive
        self._chunked_out = version == b"HTTP/1.1"
        self.started = self.finished = False
        self.on_pause = self.on_resume = None
        self._task = asyncio.get_running_loop().create_task(self._run(req))

    async def _run(self, req: Request) -> None:
        try:
            await self.server.handler(req, self)
        except asyncio.CancelledError:
            self._keep_alive = False
        except Exception:
            log.exception("handler failed for %s %s", req.method.decode(), req.path.decode(errors="replace"))
            if not self.started:
                self.respond(500, b'{"error":{"message":"internal router error","type":"internal_error","code":500}}')
            self._keep_alive = False
        finally:
            self._task = None
            if not self.finished or not self._keep_alive:
                self.close()
            elif self._buf and not self.closed:
                self.transport.resume_reading()
                try:
                    self._process()
                except HttpParseError as err:
                    self._fail(err.status, str(err))

    def _fail(self, status: int, message: str) -> None:
        from orjson import dumps
        self._keep_alive = False
        if not self.closed:
            self.started = self.finished = False
            self.respond(status, dumps({"error": {"message": message, "type": "invalid_request", "code": status}}))
            self.close()

    # ---- response side
    def _head_bytes(self, status: int, content_type: bytes, extra: bytes, framing: bytes) -> bytes:
        conn = b"" if self._keep_alive else b"connection: close\r\n"
        return b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\n%b%b%b\r\n" % (
            status, REASONS.get(status, b"Unknown"), content_type, framing, conn, extra)

    def respond(self, status: int, body: bytes, content_type: bytes = b"application/json", extra: bytes = b"") -> None:
        """Send a whole response. ``extra`` holds pre-encoded header lines, each ending in CRLF."""
        if self.closed or self.started:
            return
        self.started = self.finished = True
        self.transport.write(self._head_bytes(status, content_type, extra, b"content-length: %d\r\n" % len(body)) + body)

    def start_stream(self, status: int, content_type: bytes, extra: bytes = b"") -> None:
        if self.closed or self.started:
            return
        self.started = True
        if self._chunked_out:
            self.transport.write(self._head_bytes(status, content_type, extra, b"transfer-encoding: chunked\r\n"))
        else:  # HTTP/1.0: the end of the body is the end of the connection
            self._keep_alive = False
            self.transport.write(self._head_bytes(status, content_type, extra, b""))

    def write(self, data: bytes) -> None:
        if data and not self.closed:
            self.transport.write(encode_chunk(data) if self._chunked_out else data)

    def end(self) -> None:
        if not self.closed and not self.finished:
            self.finished = True
            if self._chunked_out:
                self.transport.write(LAST_CHUNK)

    async def drain(self) -> None:
        if self._paused and not self.closed:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


class HttpServer:
    def __init__(self, handler: Handler, *, max_body_bytes: int = 32 * 1024 * 1024,
                 keepalive_timeout: float = 120.0) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[HttpConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False, sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=2048)
        else:
            self._server = await loop.create_server(lambda: HttpConnection(self), host, port, backlog=2048,
                                                    reuse_address=True, reuse_port=reuse_port or None)
        self._sweeper = loop.create_task(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        """Close idle keep-alive connections; one timer for all instead of one per request."""
        while True:
            await asyncio.sleep(min(5.0, self.keepalive_timeout))
            cutoff = time.monotonic() - self.keepalive_timeout
            for c in [c for c in self.connections if c._task is None and c.last_active < cutoff]:
                c.close()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
            for c in list(self.connections):
                c.close()
            await self._server.wait_closed()
