"""PD rendezvous: the prefill holds each room's "KV" on its bootstrap port; the decode fetches it.

Prefill side: ``KVStore`` keeps rooms; the bootstrap HTTP server answers ``GET /kv/<room>?wait=S`` as a
long poll (the decode may ask before the prefill has computed). A prefill request completes only once a
decode fetched its room (as in SGLang, where the prefill finishes after the KV transfer), or fails after
the bootstrap timeout: an orphaned prefill shows up instead of passing silently.

Decode side: ``KVClient.fetch`` polls the prefill's bootstrap server, retrying connection failures until
the bootstrap timeout, so a wrong host/port or a prefill that never got the request ends in a timeout
error that names the room and the address.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from hpcserve.http import HttpConnection, Request, UpstreamError, UpstreamPool


class Room:
    __slots__ = ("payload", "fetched", "pollers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.payload: asyncio.Future = loop.create_future()   # set by the prefill
        self.fetched: asyncio.Future = loop.create_future()   # set when a decode received the payload
        self.pollers = 0                                      # decodes waiting for the payload


class KVStore:
    def __init__(self, stats) -> None:
        self.rooms: dict[int, Room] = {}
        self.stats = stats

    def _room(self, room: int) -> Room:
        r = self.rooms.get(room)
        if r is None:
            r = self.rooms[room] = Room(asyncio.get_running_loop())
        return r

    def put(self, room: int, payload: dict) -> Room:
        r = self._room(room)
        if r.payload.done():
            raise ValueError(f"bootstrap_room {room} is already in use by another request")
        r.payload.set_result(orjson.dumps(payload))
        self.stats.rooms_put += 1
        return r

    async def wait_fetched(self, room: int, r: Room, timeout: float) -> bool:
        """Prefill side: wait until a decode took the KV. False after the timeout (room dropped)."""
        try:
            await asyncio.wait_for(asyncio.shield(r.fetched), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if self.rooms.get(room) is r:
                del self.rooms[room]

    async def take(self, room: int, wait: float) -> bytes | None:
        """Bootstrap server side: the room's payload, waiting up to ``wait`` seconds for the prefill."""
        r = self._room(room)
        r.pollers += 1
        try:
            return await asyncio.wait_for(asyncio.shield(r.payload), wait)
        except asyncio.TimeoutError:
            return None
        finally:
            r.pollers -= 1
            if not r.payload.done() and not r.pollers and self.rooms.get(room) is r:
                del self.rooms[room]  # nobody put it and nobody waits (timeout or the decode went away)

    def delivered(self, room: int) -> None:
        r = self.rooms.get(room)
        if r is not None and not r.fetched.done():
            r.fetched.set_result(None)
            self.stats.rooms_fetched += 1


class BootstrapServer:
    """HTTP handler of the prefill's bootstrap port. Engines that ship KV another way override the two
    class attributes (the torch engine sends raw tensor bytes)."""

    CONTENT_TYPE = b"application/json"
    HEALTH = b'{"status":"ok","mock":true}'

    def __init__(self, store: KVStore, max_wait: float) -> None:
        self.store = store
        self.max_wait = max_wait

    async def handle(self, req: Request, conn: HttpConnection) -> None:
        path = req.path
        if path.startswith(b"/kv/") and req.method == b"GET":
            try:
                room = int(path[4:])
                wait = float(_query(req.query, b"wait") or self.max_wait)
            except ValueError:
                conn.respond(400, b'{"error":{"message":"bad room or wait"}}')
                return
            data = await self.store.take(room, min(wait, self.max_wait))
            if data is None:
                conn.respond(404, orjson.dumps({"error": {"message": f"bootstrap_room {room} not found"}}))
                return
            conn.respond(200, data, self.CONTENT_TYPE)
            if not conn.closed:
                self.store.delivered(room)
        elif path in (b"/health", b"/route"):
            conn.respond(200, self.HEALTH)
        else:
            conn.respond(404, b'{"error":{"message":"not found"}}')


def _query(query: bytes, name: bytes) -> bytes | None:
    for part in query.split(b"&"):
        k, _, v = part.partition(b"=")
        if k == name:
            return v
    return None


class BootstrapTimeout(Exception):
    pass


class KVClient:
    """Decode side: fetch a room's payload from a prefill's bootstrap server, with one pool per address."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, int], UpstreamPool] = {}

    def _pool(self, host: str, port: int) -> UpstreamPool:
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = UpstreamPool(host, port, name=f"bootstrap server {host}:{port}",
                                                           connect_timeout=2.0)
        return pool

    def payload(self, status: int, ctype: bytes, body: bytes):
        """The room's payload from an answer, or None when it is not one (keep polling)."""
        return orjson.loads(body) if status == 200 else None

    def refusal(self, status: int, ctype: bytes) -> str:
        return f"bootstrap server answered {status}"

    async def fetch(self, host: str, port: int, room: int, timeout: float):
        deadline = time.monotonic() + timeout
        pool = self._pool(host, port)
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootstrapTimeout(
                    f"bootstrap timeout: the KV of bootstrap_room {room} did not arrive from the prefill's "
                    f"bootstrap server {host}:{port} within {timeout:g} s ({last})")
            try:
                status, ctype, body = await pool.fetch(b"GET", b"/kv/%d?wait=%.3f" % (room, left),
                                                       timeout=left + 5.0)
            except UpstreamError as err:
                last = str(err)
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            payload = self.payload(status, ctype, body)
            if payload is not None:
                return payload
            last = self.refusal(status, ctype)
            if status != 404:
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
