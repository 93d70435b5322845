"""PD transfer: the prefill holds each room's packed KV on its bootstrap port; the decode fetches it.

Prefill side: rooms live in the mock's ``KVStore`` (same long-poll semantics: a decode may ask before the
prefill is done, and a prefill completes only once its KV was fetched). The bootstrap server answers
``GET /kv/<room>?wait=S`` with ``application/octet-stream`` (kvwire format). Decode side: ``KVFetcher``
(the mock's KVClient) polls, retrying connection failures until the bootstrap timeout.
"""

from __future__ import annotations

from hpcserve.engine_shell.bootstrap import BootstrapServer, KVClient, KVStore, Room

OCTETS = b"application/octet-stream"


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


class KVFetcher(KVClient):
    """The mock's decode-side poller, taking raw KV tensor bytes instead of JSON."""

    def payload(self, status: int, ctype: bytes, body: bytes) -> bytes | None:
        return body if status == 200 and ctype.startswith(OCTETS) else None

    def refusal(self, status: int, ctype: bytes) -> str:
        return f"bootstrap server answered {status} {ctype.decode(errors='replace')}"
