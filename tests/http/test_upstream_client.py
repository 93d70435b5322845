"""The pooled upstream client's whole-request API (UpstreamPool.exchange: health probes, admin calls, the batch
driver) against a raw socket server that answers in every HTTP shape."""

from __future__ import annotations

import asyncio

import pytest

from hpcserve.http import ConnectError, UpstreamConn, UpstreamError, UpstreamPool, UpstreamTimeout

ANSWERS = {
    b"/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=1\r\nlo\r\n0\r\n\r\n",
    b"/eof": b"HTTP/1.0 503 Busy\r\nRetry-After: 2\r\n\r\nbye",
    b"/continue": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    b"/garbage": b"SSH-2.0-OpenSSH\r\n\r\n",
}


class RawServer:
    """Answers by path; '/eof' and '/garbage' close after answering; '/drop' closes the idle socket
    after answering (a keep-alive timeout); '/race' closes a socket that served before without answering;
    '/hang' never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1]
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                served += 1
                if path == b"/race" and served > 1:  # closes a reused socket as the request arrives
                    writer.close()
                    return
                if path == b"/race":
                    path = b"/length"
                if path == b"/hang":
                    await asyncio.sleep(30)
                if path == b"/drop":
                    writer.write(ANSWERS[b"/length"])
                    await writer.drain()
                    writer.close()
                    return
                writer.write(ANSWERS[path])
                await writer.drain()
                if path in (b"/eof", b"/garbage"):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


def test_every_answer_shape_and_keep_alive_reuse():
    async def go():
        srv = RawServer()
        port = await srv.start()
        pool = UpstreamPool("127.0.0.1", port)
        try:
            got = [await pool.exchange(b"POST", p, b"{}", timeout=5) for p in (b"/length", b"/chunked", b"/continue")]
            assert [(r.status, r.body) for r in got] == [(200, b"hello"), (200, b"hello"), (201, b"ok")]
            assert srv.connections == 1  # one socket reused for all three
            r = await pool.exchange(b"POST", b"/eof", b"{}", timeout=5)  # HTTP/1.0, body ended by the close
            assert (r.status, r.header(b"Retry-After"), r.body) == (503, b"2", b"bye")
            with pytest.raises(UpstreamError, match="malformed HTTP"):
                await pool.exchange(b"POST", b"/garbage", b"{}", timeout=5)
            with pytest.raises(UpstreamTimeout, match=r"no response within the first-byte timeout \(0.2 s\)"):
                await pool.exchange(b"POST", b"/hang", b"{}", timeout=0.2)
            # the server drops the idle socket: the next request goes out again on a fresh one
            await pool.exchange(b"POST", b"/drop", b"{}", timeout=5)
            await asyncio.sleep(0.05)
            before = srv.connections
            assert (await pool.exchange(b"POST", b"/length", b"{}", timeout=5)).body == b"hello"
            assert srv.connections == before + 1
            # a keep-alive race: the reused socket closes without answering; sent again on a new one
            assert (await pool.exchange(b"POST", b"/race", b"{}", timeout=5)).body == b"hello"
            assert (await pool.exchange(b"POST", b"/race", b"{}", timeout=5)).body == b"hello"
            assert srv.connections == before + 3  # each /race met a reused socket and went again
        finally:
            pool.close()
            await srv.stop()

    asyncio.run(go())


def test_connect_failure_is_a_connect_error():
    async def go():
        srv = RawServer()
        port = await srv.start()
        await srv.stop()
        with pytest.raises(ConnectError, match="cannot connect to 127.0.0.1"):
            await UpstreamPool("127.0.0.1", port).exchange(b"POST", b"/x", b"", timeout=5)

    asyncio.run(go())


class _Transport(asyncio.Transport):
    """In-memory transport: the test decides how the answer's bytes arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def close(self) -> None:
        self.closed = True


class _Recorder:
    """An owner that records what the reader reports; ``relay`` collects the body through a sink instead."""

    def __init__(self, relay: bool) -> None:
        self.relay = relay
        self.heads: list[int] = []
        self.done: list[tuple] = []
        self.streamed: list[bytes] = []

    def on_head(self, conn) -> None:
        self.heads.append(conn.status)
        if self.relay:
            conn.sink = self.streamed.append

    def on_done(self, conn, err) -> None:
        body = b"".join(self.streamed) if self.relay else conn.body()
        self.done.append((conn.status, body, None if err is None else type(err).__name__))


SPLIT_ANSWERS = [  # (bytes, status, body, socket reusable afterwards)
    (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello", 200, b"hello", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200, b"", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok", 201, b"ok", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 200, b"abcde", True),
    (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope", 502, b"nope", False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi", 200, b"hi", False),
]


@pytest.mark.parametrize("relay", [False, True], ids=["whole", "relay"])
@pytest.mark.parametrize("answer,status,body,reusable", SPLIT_ANSWERS)
def test_reader_gives_the_same_answer_however_the_bytes_are_split(answer, status, body, reusable, relay):
    async def go():
        pool = UpstreamPool("127.0.0.1", 9)
        splits = [[answer], [answer[i:i + 1] for i in range(len(answer))]]
        splits += [[answer[:cut], answer[cut:]] for cut in range(1, len(answer))]
        for pieces in splits:
            conn = UpstreamConn(pool)
            conn.connection_made(_Transport())
            owner = _Recorder(relay)
            conn.send(b"GET / HTTP/1.1\r\n\r\n", owner, (5.0, 5.0, 5.0), notify_head=relay)
            for piece in pieces:
                conn.data_received(piece)
            assert owner.done == [(status, body, None)], pieces
            assert owner.heads == ([status] if relay else [])
            assert conn.complete and conn.reusable == reusable and conn not in pool.watchdog.active
            pool.release(conn)
            assert (pool.take_idle() is conn) == reusable  # a reusable socket goes back to the pool
        pool.close()

    asyncio.run(go())
