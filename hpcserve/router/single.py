"""The aggregated-mode exchange: the request goes to one worker as it came (re-dispatched to another one if
that worker dies or stalls before the client got a byte)."""

from __future__ import annotations

from hpcserve.http import UpstreamConn, UpstreamError
from hpcserve.router.dispatch import Exchange, Leg


class Single(Exchange):
    """Aggregated mode: the request goes to one worker as it came."""

    __slots__ = ("raw", "leg")

    def __init__(self, *args, raw: bytes) -> None:
        super().__init__(*args)
        self.raw = raw
        self.leg: Leg | None = None

    def legs(self) -> list[Leg]:
        return [self.leg] if self.leg is not None else []

    def take(self) -> None:
        self.leg = self.d.take("both", self.key, self.avoid)

    def movable(self, conn: UpstreamConn) -> bool:
        return self.leg is not None and conn is self.leg.conn and self.can_move()

    def reset(self) -> None:
        self.leg = None

    def ready(self) -> bool:
        return self.leg.conn is not None

    async def connect_missing(self) -> None:
        self.leg = await self.d.connect(self.leg, "both", self.key)

    def begin(self) -> None:
        self.request(self.leg, self.raw)

    def on_head(self, conn: UpstreamConn) -> None:
        if self.stream and conn.status == 200:
            self.relay(conn, self.client.write)

    def on_done(self, conn: UpstreamConn, err: UpstreamError | None) -> None:
        if err is not None:
            leg = self.leg
            self.d.settle(leg, err)
            if not self.redispatch(leg, err):
                self.upstream_failed(err)
            return
        if self.client.started:
            self.client.end()
        else:
            self.client.respond(conn.status, conn.body(), conn.ctype, self.extra)
        self.d.settle(self.leg, None)
        self.finish(conn.status)
