"""Following the Redis worker registry (hpcserve.registry): pub/sub on the changes channel for sub-second
updates, plus a full rescan every few seconds that also catches expired heartbeats. While Redis is away the
router keeps serving from the last view and reconnects in the background.

A Redis that restarts (or is flushed) comes back empty, and the client may reconnect without this follower
noticing. So a rescan never drops a worker only because the registry stopped listing it: the view is rebuilt
from what the agents re-register (each checks its records every heartbeat) and a worker no rescan has listed
for ``unlisted_grace`` seconds is dropped then. A removal (the agent's notification) or an expired heartbeat
of a listed record takes effect at once."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hpcserve.registry import (WorkerRecord, changes_channel, heartbeat_key, load_policies, routing_channel,
                               workers_key)
from hpcserve.router.workers import WorkerSet

log = logging.getLogger("hpcserve.router")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


class RegistryFollower:
    # Agents re-register every heartbeat (1 s), and their Redis client may back off a few seconds between
    # reconnect attempts: long enough for that, short enough that a worker whose removal was missed goes soon.
    UNLISTED_GRACE = 10.0

    def __init__(self, workers: WorkerSet, url: str, run_id: str, *, rescan_interval: float = 2.0,
                 unlisted_grace: float = UNLISTED_GRACE) -> None:
        self.workers = workers
        self.url = url
        self.run_id = run_id
        self.rescan_interval = rescan_interval
        self.connected = False
        self.last_sync = 0.0
        self.last_error = ""
        self.sessions = 0
        self.unlisted_grace = unlisted_grace
        self._last_records: dict[str, WorkerRecord] = {}   # the view's records, kept ones included
        self._unlisted: dict[str, float] = {}              # worker -> loop time a rescan first missed it
        self._unlisted_logged: set[str] = set()
        self._routing = {routing_channel(run_id), routing_channel(run_id).encode()}
        self.on_policies = None   # callable(role -> policy name): operators' policy choices (control API)

    async def _load_one(self, client: aioredis.Redis, wid: str) -> WorkerRecord | None:
        pipe = client.pipeline(transaction=False)
        pipe.hget(workers_key(self.run_id), wid)
        pipe.exists(heartbeat_key(self.run_id, wid))
        raw, alive = await pipe.execute()
        rec = self._parse(wid, raw) if raw is not None else None
        if rec is None:
            return None
        return rec if alive else rec.model_copy(update={"state": "dead"})

    def _parse(self, wid: str, raw: bytes) -> WorkerRecord | None:
        try:
            return WorkerRecord.from_json(raw)
        except ValueError as err:  # one bad record must not stop following the others
            log.warning("ignoring unreadable registry record %s: %s", wid, str(err).splitlines()[0])
            return None

    async def _rescan(self, client: aioredis.Redis) -> None:
        """Like registry.load_workers (heartbeat expiry -> dead), but skipping unreadable records."""
        raw = await client.hgetall(workers_key(self.run_id))
        records: dict[str, WorkerRecord] = {}
        for k, v in raw.items():
            wid = k.decode() if isinstance(k, bytes) else k
            rec = self._parse(wid, v)
            if rec is not None:
                records[wid] = rec
        if records:
            ids = list(records)
            alive = await client.mget([heartbeat_key(self.run_id, w) for w in ids])
            for wid, hb in zip(ids, alive):
                if hb is None:
                    records[wid] = records[wid].model_copy(update={"state": "dead"})
        records = self._keep_unlisted(records)
        self._last_records = records
        self.workers.sync_registry(records)
        await self._policies(client)
        self.last_sync = asyncio.get_running_loop().time()

    def _keep_unlisted(self, records: dict[str, WorkerRecord]) -> dict[str, WorkerRecord]:
        """``records`` plus the view's workers this rescan does not list, until they stayed unlisted for the
        grace period; their agents re-register them meanwhile (Redis restarted or flushed)."""
        now = asyncio.get_running_loop().time()
        kept: dict[str, WorkerRecord] = {}
        for wid, rec in self._last_records.items():
            if wid in records:
                continue
            since = self._unlisted.setdefault(wid, now)
            if now - since < self.unlisted_grace:
                kept[wid] = rec
            else:
                log.warning("worker %s removed: the registry has not listed it for %.0f s", wid, now - since)
        if kept.keys() - self._unlisted_logged:
            log.warning("the registry does not list %s (Redis restarted or flushed?); keeping them for up to "
                        "%.0f s while their agents re-register", ", ".join(sorted(kept)), self.unlisted_grace)
        self._unlisted = {w: t for w, t in self._unlisted.items() if w in kept}
        self._unlisted_logged = set(kept)
        return {**kept, **records}

    async def _policies(self, client: aioredis.Redis) -> None:
        if self.on_policies is not None:
            self.on_policies(await load_policies(client, self.run_id))

    async def _session(self) -> None:
        client = aioredis.from_url(self.url, socket_connect_timeout=2.0, socket_timeout=5.0,
                                   health_check_interval=10)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(changes_channel(self.run_id), routing_channel(self.run_id))
            self.sessions += 1
            await self._rescan(client)  # after subscribing, so no change falls in between
            if not self.connected:
                log.info("following the worker registry at %s (run %s)", redact_url(self.url), self.run_id)
            self.connected = True
            loop = asyncio.get_running_loop()
            next_scan = loop.time() + self.rescan_interval
            while True:
                wait = max(0.0, min(0.5, next_scan - loop.time()))
                msg = await pubsub.get_message(timeout=wait)
                if msg is not None and msg.get("type") == "message" and msg["channel"] in self._routing:
                    await self._policies(client)
                elif msg is not None and msg.get("type") == "message":
                    data = msg["data"]
                    wid = data.decode() if isinstance(data, bytes) else str(data)
                    rec = await self._load_one(client, wid)
                    self._unlisted.pop(wid, None)
                    if rec is None:   # removed by its agent: gone now, no grace
                        self._last_records.pop(wid, None)
                    else:
                        self._last_records[wid] = rec
                    self.workers.apply_record(wid, rec)
                if loop.time() >= next_scan:
                    await self._rescan(client)
                    next_scan = loop.time() + self.rescan_interval
        finally:
            try:
                await pubsub.aclose() if hasattr(pubsub, "aclose") else await pubsub.close()
                await client.aclose() if hasattr(client, "aclose") else await client.close()
            except Exception:
                pass

    async def run(self) -> None:
        backoff = 0.25
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, ValueError) as err:
                msg = str(err).replace(self.url, redact_url(self.url))
                if self.connected or msg != self.last_error:
                    log.warning("registry at %s unavailable (%s); serving the last known %d workers",
                                redact_url(self.url), msg, len(self.workers.workers))
                backoff = 0.25 if self.connected else min(backoff * 2, 2.0)
                self.connected = False
                self.last_error = msg
                await asyncio.sleep(backoff)
