"""The lean HTTP layer on real sockets: request framing, odd upstream answers, timeouts, keep-alive."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hpcserve.http import HttpServer, UpstreamError, UpstreamPool, UpstreamTimeout
from hpcserve.http.parse import ChunkedDecoder, HttpParseError


def test_chunked_decoder_byte_by_byte_and_errors():
    data = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT"
    dec, out = ChunkedDecoder(), []
    for i in range(len(data)):
        out += dec.feed(data[i:i + 1])
    assert b"".join(out) == b"hello world" and dec.done and dec.tail == b"NEXT"
    with pytest.raises(HttpParseError):
        ChunkedDecoder().feed(b"zz\r\n")
    with pytest.raises(HttpParseError) as err:
        ChunkedDecoder(limit=4).feed(b"5\r\nhello\r\n")
    assert err.value.status == 413


async def _raw_server(answer: bytes, close: bool = True):
    """A TCP server that reads a request head and writes ``answer`` as is."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if close:
            writer.close()
        else:
            await asyncio.sleep(30)
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("answer,expect", [
    (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close", (200, b"until close")),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", (201, b"ok")),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", (200, b"abc")),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", UpstreamError),
    (b"garbage that is not http\r\n\r\n", UpstreamError),
])
def test_upstream_answers(answer, expect):
    async def run():
        server, port = await _raw_server(answer)
        pool = UpstreamPool("127.0.0.1", port)
        try:
            if isinstance(expect, tuple):
                status, _, body = await pool.fetch(b"GET", b"/x", timeout=5)
                assert (status, body) == expect
            else:
                with pytest.raises(expect):
                    await pool.fetch(b"GET", b"/x", timeout=5)
        finally:
            pool.close()
            server.close()
    asyncio.run(run())


def test_upstream_first_byte_timeout_and_refused_connect():
    async def run():
        server, port = await _raw_server(b"", close=False)  # accepts, never answers
        pool = UpstreamPool("127.0.0.1", port)
        with pytest.raises(UpstreamTimeout, match="first-byte timeout"):
            await pool.fetch(b"GET", b"/slow", timeout=0.3)
        server.close()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        with pytest.raises(UpstreamError, match="cannot connect"):
            await UpstreamPool("127.0.0.1", dead).fetch(b"GET", b"/", timeout=2)
    asyncio.run(run())


def test_server_framing_keep_alive_expect_and_http10():
    seen = []

    def handler(req, conn):
        seen.append((req.method, req.path, req.body))
        conn.respond(200, b"got %d" % len(req.body), b"text/plain")

    async def run():
        server = HttpServer(handler, max_body_bytes=100)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abc")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(5) == b"got 3"
        writer.write(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")  # same socket
        await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(5) == b"got 2"
        writer.write(b"POST /c HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
        too_big = await reader.read(1000)
        assert too_big.startswith(b"HTTP/1.1 413") and b"connection: close" in too_big
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /old HTTP/1.0\r\n\r\n")
        old = await reader.read(1000)
        assert old.startswith(b"HTTP/1.1 200") and b"connection: close" in old
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NONSENSE\r\n\r\n")
        assert (await reader.read(1000)).startswith(b"HTTP/1.1 400")
        writer.close()
        await server.stop()

    asyncio.run(run())
    assert seen == [(b"POST", b"/a", b"abc"), (b"POST", b"/b", b"hi"), (b"GET", b"/old", b"")]
