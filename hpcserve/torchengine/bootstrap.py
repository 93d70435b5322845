"""PD transfer: the prefill holds each room's packed KV on its bootstrap port; the decode fetches it.

Prefill side: rooms live in the mock's ``KVStore`` (same long-poll semantics: a decode may ask before the
prefill is done, and a prefill completes only once its KV was fetched). The bootstrap server answers
``GET /kv/<room>?wait=S`` with ``application/octet-stream`` (kvwire format). Decode side: ``KVFetcher``
polls, retrying connection failures until the bootstrap timeout.
"""

from __future__ import annotations

import asyncio
import time

from hpcserve.http import UpstreamError, UpstreamPool
from hpcserve.mock.bootstrap import BootstrapServer, KVStore, Room

OCTETS = b"application/octet-stream"


class BootstrapTimeout(Exception):
    pass


class StoreStats:
    rooms_put = 0
    rooms_fetched = 0


class BinaryKVStore(KVStore):
    def __init__(self) -> None:
        super().__init__(StoreStats())

    def put_bytes(self, room: int, payload: bytes) -> Room:
        r = self._room(room)
        if r.payload.done():
            raise ValueError(f"bootstrap_room {room} is already in use by another request")
        r.payload.set_result(payload)
        self.stats.rooms_put += 1
        return r


class BinaryBootstrapServer(BootstrapServer):
    """The mock's bootstrap handler, serving raw KV tensor bytes instead of JSON."""

    CONTENT_TYPE = OCTETS
    HEALTH = b'{"status":"ok","engine":"torch"}'


class KVFetcher:
    """Decode side: one keep-alive pool per prefill bootstrap address."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, int], UpstreamPool] = {}

    async def fetch(self, host: str, port: int, room: int, timeout: float) -> bytes:
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = UpstreamPool(host, port, name=f"bootstrap server {host}:{port}",
                                                           connect_timeout=2.0)
        deadline = time.monotonic() + timeout
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
            if status == 200 and ctype.startswith(OCTETS):
                return body
            last = f"bootstrap server answered {status} {ctype.decode(errors='replace')}"
            if status != 404:
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
