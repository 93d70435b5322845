"""The worker registry in Redis: the one contract between node agents (writers) and the router (reader).

Keys, all under ``hpcserve:{run_id}:``:
  workers          hash   worker_id -> WorkerRecord JSON
  hb:{worker_id}   string heartbeat with a TTL; a worker whose key expired is treated as dead by readers
  changes          pub/sub channel; the worker_id is published after every change to ``workers``
  events           stream of state changes, restarts and errors (capped)
  status           hash   job phase and batch/bench progress fields
  policies         hash   role -> routing policy name chosen by an operator (the router follows it)
  routing          pub/sub channel; a role is published after every change to ``policies``
  commands         pub/sub channel; Command JSON from the control API to the node agents
"""

from __future__ import annotations

import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

Role = Literal["prefill", "decode", "both"]
WorkerState = Literal["starting", "ready", "draining", "dead"]
EVENTS_MAXLEN = 10_000


def prefix(run_id: str) -> str:
    return f"hpcserve:{run_id}:"


def workers_key(run_id: str) -> str:
    return prefix(run_id) + "workers"


def heartbeat_key(run_id: str, worker_id: str) -> str:
    return prefix(run_id) + f"hb:{worker_id}"


def changes_channel(run_id: str) -> str:
    return prefix(run_id) + "changes"


def events_key(run_id: str) -> str:
    return prefix(run_id) + "events"


def status_key(run_id: str) -> str:
    return prefix(run_id) + "status"


def policies_key(run_id: str) -> str:
    return prefix(run_id) + "policies"


def routing_channel(run_id: str) -> str:
    return prefix(run_id) + "routing"


def commands_channel(run_id: str) -> str:
    return prefix(run_id) + "commands"


class WorkerRecord(BaseModel):
    """One engine server as the router sees it. ``url`` is what the router dials."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    role: Role
    group: str
    url: str
    bootstrap_port: int | None = None
    node: int
    host: str
    state: WorkerState = "starting"
    started_at: float = 0.0
    restarts: int = 0
    rotation: bool = True   # False: an operator took it out of rotation (the router sends it nothing new)

    @property
    def bootstrap_host(self) -> str:
        return self.host

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump())

    @classmethod
    def from_json(cls, raw: bytes | str) -> "WorkerRecord":
        return cls.model_validate(orjson.loads(raw))


class Event(BaseModel):
    """One entry of the events stream: ``kind`` (ready, exit, restart, dead, action, ...), when, and the
    entry's other fields as strings."""

    id: str
    kind: str
    ts: float
    fields: dict[str, str] = {}

    @classmethod
    def from_entry(cls, entry_id: bytes | str, body: dict) -> "Event":
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in body.items()}
        kind = d.pop("kind", "")
        try:
            ts = float(d.pop("ts", 0.0))
        except ValueError:
            ts = 0.0
        return cls(id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id, kind=kind, ts=ts, fields=d)


CommandAction = Literal["restart", "drain", "rotate_out", "rotate_in"]


class Command(BaseModel):
    """An operator action for the node agent that runs ``worker`` (sent on the commands channel)."""

    action: CommandAction
    worker: str


async def send_command(redis: Any, run_id: str, cmd: Command) -> int:
    """Publish a command; returns how many agents are listening (0: none would act on it)."""
    return await redis.publish(commands_channel(run_id), cmd.model_dump_json())


async def set_policy(redis: Any, run_id: str, role: str, policy: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.hset(policies_key(run_id), role, policy)
    pipe.publish(routing_channel(run_id), role)
    await pipe.execute()


async def load_policies(redis: Any, run_id: str) -> dict[str, str]:
    raw = await redis.hgetall(policies_key(run_id))
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


async def recent_events(redis: Any, run_id: str, count: int = 50) -> list[Event]:
    """The last ``count`` events, oldest first."""
    rows = await redis.xrevrange(events_key(run_id), count=count)
    return [Event.from_entry(i, body) for i, body in reversed(rows)]


async def publish_worker(redis: Any, run_id: str, rec: WorkerRecord, hb_ttl: float | None = None) -> None:
    """Write or update one worker and tell followers. ``redis`` is a redis.asyncio client."""
    pipe = redis.pipeline(transaction=False)
    pipe.hset(workers_key(run_id), rec.id, rec.to_json())
    if hb_ttl:
        pipe.set(heartbeat_key(run_id, rec.id), b"1", px=int(hb_ttl * 1000))
    pipe.publish(changes_channel(run_id), rec.id)
    await pipe.execute()


async def remove_worker(redis: Any, run_id: str, worker_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.hdel(workers_key(run_id), worker_id)
    pipe.delete(heartbeat_key(run_id, worker_id))
    pipe.publish(changes_channel(run_id), worker_id)
    await pipe.execute()


async def heartbeat(redis: Any, run_id: str, worker_ids: list[str], ttl: float) -> None:
    pipe = redis.pipeline(transaction=False)
    for wid in worker_ids:
        pipe.set(heartbeat_key(run_id, wid), b"1", px=int(ttl * 1000))
    await pipe.execute()


async def load_workers(redis: Any, run_id: str, *, require_heartbeat: bool = True) -> dict[str, WorkerRecord]:
    """The full registry; workers whose heartbeat expired are reported with state 'dead'."""
    raw = await redis.hgetall(workers_key(run_id))
    recs = {}
    for k, v in raw.items():
        rec = WorkerRecord.from_json(v)
        recs[k.decode() if isinstance(k, bytes) else k] = rec
    if require_heartbeat and recs:
        ids = list(recs)
        alive = await redis.mget([heartbeat_key(run_id, w) for w in ids])
        for wid, hb in zip(ids, alive):
            if hb is None and recs[wid].state != "dead":
                recs[wid] = recs[wid].model_copy(update={"state": "dead"})
    return recs


async def emit_event(redis: Any, run_id: str, kind: str, **fields: Any) -> None:
    body = {"kind": kind, "ts": f"{time.time():.3f}"}
    body.update({k: str(v) for k, v in fields.items()})
    await redis.xadd(events_key(run_id), body, maxlen=EVENTS_MAXLEN, approximate=True)


async def set_status(redis: Any, run_id: str, **fields: Any) -> None:
    await redis.hset(status_key(run_id), mapping={k: str(v) for k, v in fields.items()})
