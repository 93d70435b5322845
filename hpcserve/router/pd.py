"""The PD exchange: one request sent to a prefill and a decode worker at once (SGLang's protocol)."""

from __future__ import annotations

import random

import orjson

from hpcserve.http import UpstreamConn, UpstreamError
from hpcserve.router import logprobs
from hpcserve.router.dispatch import Exchange, Leg, _discard, batch_size

ROOM_MASK = (1 << 63) - 1
BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
_splices: dict[tuple, bytes] = {}


def bootstrap_splice(host: str, port: int | None) -> bytes:
    """The JSON members to insert before a body's closing brace, up to the room number (cached per worker)."""
    key = (host, port)
    out = _splices.get(key)
    if out is None:
        if len(_splices) > 4096:  # workers come and go with the registry: keep the cache bounded
            _splices.clear()
        out = _splices[key] = b'"bootstrap_host":%b,"bootstrap_port":%b,"bootstrap_room":' % (
            orjson.dumps(host), orjson.dumps(port))
    return out


def splice_bootstrap(raw: bytes, body: dict, host: str, port: int | None, room: int) -> bytes | None:
    """``raw`` with the bootstrap fields added, without re-serialising it; None when that is not safe
    (the client sent bootstrap fields of its own, or ``raw`` does not end in the object's brace)."""
    end = len(raw.rstrip()) - 1
    if end < 1 or raw[end] != 0x7D or not body.keys().isdisjoint(BOOTSTRAP_KEYS):  # 0x7D: b"}"
        return None
    return b"%b%b%b%d}" % (raw[:end], b"," if body else b"", bootstrap_splice(host, port), room)


class Pair(Exchange):
    __slots__ = ("body", "raw", "pre", "dec", "want_logprob", "prefill_items", "merger", "head_waiting",
                 "decode_waiting")

    def __init__(self, *args, body: dict, raw: bytes = b"") -> None:
        super().__init__(*args)
        self.body = body
        self.raw = raw  # the client's bytes: the bootstrap fields are spliced in when safe
        self.pre: Leg | None = None
        self.dec: Leg | None = None
        # the merger format, or None; two dict lookups decide for the common request that wants none
        self.want_logprob = (logprobs.wanted(self.path, body)
                             if body.get("return_logprob") is not None or body.get("echo") else None)
        self.prefill_items: dict | None = None
        self.merger: logprobs.SseMerger | None = None
        self.head_waiting = False  # decode's stream head came before the prefill logprobs it needs
        self.decode_waiting = False  # decode finished before the prefill logprobs it needs

    def legs(self) -> list[Leg]:
        return [leg for leg in (self.pre, self.dec) if leg is not None]

    def take(self) -> None:
        self.pre = self.d.take("prefill", self.key)
        self.dec = self.d.take("decode", self.key, self.avoid)

    def movable(self, conn: UpstreamConn) -> bool:
        # only a decode leg: bytes that reached a prefill are never replayed
        return self.dec is not None and conn is self.dec.conn and self.can_move()

    def reset(self) -> None:
        self.pre = self.dec = None
        self.prefill_items = None
        self.merger = None
        self.head_waiting = self.decode_waiting = False

    def ready(self) -> bool:
        return self.pre.conn is not None and self.dec.conn is not None

    async def connect_missing(self) -> None:
        if self.pre.conn is None:
            self.pre = await self.d.connect(self.pre, "prefill", self.key)
        if self.dec.conn is None:
            self.dec = await self.d.connect(self.dec, "decode", self.key)

    def begin(self) -> None:
        p = self.pre.w
        body = self.body
        n = batch_size(body)
        room = random.getrandbits(63)
        raw = None
        if n is None:
            raw = splice_bootstrap(self.raw, body, p.bootstrap_host, p.bootstrap_port, room)
            if raw is None:
                body["bootstrap_host"] = p.bootstrap_host
                body["bootstrap_port"] = p.bootstrap_port
                body["bootstrap_room"] = room
        else:
            body["bootstrap_host"] = [p.bootstrap_host] * n
            body["bootstrap_port"] = [p.bootstrap_port] * n
            body["bootstrap_room"] = [(room + i) & ROOM_MASK for i in range(n)]
        if raw is None:
            raw = orjson.dumps(body)
        self.request(self.pre, raw)
        self.request(self.dec, raw)

    # ---- upstream callbacks
    def on_head(self, conn: UpstreamConn) -> None:
        if conn is self.pre.conn:
            if self.stream and not self.want_logprob and conn.status == 200:
                conn.sink = _discard  # the prefill's own stream carries nothing we return (its errors we do)
        elif self.stream and conn.status == 200 and not self.done:
            if self.want_logprob and self.prefill_items is None:
                self.head_waiting = True
            else:
                self._relay()

    def _relay(self) -> None:
        if self.want_logprob:
            self.merger = logprobs.SseMerger(self.want_logprob, self.prefill_items or {}, self.client.write)
            self.relay(self.dec.conn, self.merger)
        else:
            self.relay(self.dec.conn, self.client.write)

    def on_done(self, conn: UpstreamConn, err: UpstreamError | None) -> None:
        if self.pre is not None and conn is self.pre.conn:
            self._prefill_done(conn, err)
        else:
            self._decode_done(conn, err)

    def _prefill_done(self, conn: UpstreamConn, err: UpstreamError | None) -> None:
        pre, d = self.pre, self.d
        if err is None and conn.status < 300:
            if self.want_logprob:
                self.prefill_items = logprobs.parse_prefill(self.want_logprob, conn.body())
            d.settle(pre, None)
            if self.head_waiting and not self.done:
                self.head_waiting = False
                self._relay()
            if self.decode_waiting:
                self.decode_waiting = False
                self._decode_done(self.dec.conn, None)
            return
        # The prefill failed: the decode can never get its KV cache, so it is cancelled.
        status, ctype, body = conn.status, conn.ctype, conn.body()
        d.settle(pre, err)
        d.cancel(self.dec, f"prefill worker {pre.w.id} failed")
        if self.done:
            return
        if err is not None:
            self.upstream_failed(err, "prefill failed, decode cancelled: ")
        elif status < 500 and not self.client.started:  # the client's mistake (e.g. validation): as is
            self.client.respond(status, body, ctype, self.extra)
            self.finish(status)
        else:
            self.fail(502, f"prefill worker {pre.w.id} failed with HTTP {status}, decode cancelled: "
                           f"{body[:500].decode(errors='replace')}")

    def _decode_done(self, conn: UpstreamConn, err: UpstreamError | None) -> None:
        dec, pre, d, client = self.dec, self.pre, self.d, self.client
        if not dec.open:
            return
        if err is not None:
            d.settle(dec, err)
            d.cancel(pre, f"decode worker {dec.w.id} failed")  # its room's KV has nowhere to go now
            if not self.done and not self.redispatch(dec, err):  # a new PD request: fresh room, new pair
                self.upstream_failed(err)
            return
        if self.done:
            d.settle(dec, None)
            return
        if client.started:  # the stream was relayed
            if self.merger is not None:
                self.merger.flush()
            client.end()
            d.settle(dec, None)
            self.finish(200)
            return
        status = conn.status
        if status == 200 and self.want_logprob and self.prefill_items is None and pre.open:
            self.decode_waiting = True
            return
        if status >= 300:
            d.cancel(pre, f"decode worker {dec.w.id} answered HTTP {status}")
        body = conn.body()
        if status == 200 and self.prefill_items:
            body = logprobs.merge_body(self.want_logprob, self.prefill_items, body)
        client.respond(status, body, conn.ctype, self.extra)
        d.settle(dec, None)
        self.finish(status)
