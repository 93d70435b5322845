"""API bodies. Workers and events are the registry's own records (hpcserve.registry), extended, not copied."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from hpcserve.registry import CommandAction, Event, WorkerRecord
from hpcserve.router.policies import POLICIES

PolicyName = Literal[tuple(sorted(POLICIES))]  # type: ignore[valid-type]  # one enum in the OpenAPI schema


class WorkerView(WorkerRecord):
    """A registry record plus what the router and the engine say about the worker now."""

    inflight: int | None = None             # requests the router has at this worker (all router processes)
    requests: int | None = None             # requests the router sent it since the router started
    healthy: bool | None = None             # the router's breaker: closed (serving) or not
    circuit: str | None = None
    last_error: str = ""                    # the router's last failed probe or request to it
    kv_usage: float | None = None           # sglang:token_usage (0..1), where the engine reports it
    cached_token_ratio: float | None = None  # sglang:cache_hit_rate, where the engine reports it


class GroupView(BaseModel):
    group: str
    role: str
    workers: list[str]
    policy: str | None = None               # in effect at the router (None: router not answering)
    chosen_policy: str | None = None        # an operator's choice in the registry, if any


class RunView(BaseModel):
    run_id: str
    name: str
    mode: str
    engine: str
    backend: str
    nodes: int
    point: dict = {}                        # the sweep point's values (empty outside sweeps)
    phase: str
    endpoint: str | None = None
    control: str
    started_at: float | None = None
    ready_at: float | None = None
    progress: dict[str, str] = {}           # batch_* fields of the registry's status hash
    groups: list[GroupView]


class PolicyChange(BaseModel):
    policy: PolicyName


class RotationChange(BaseModel):
    rotation: bool


class ActionResult(BaseModel):
    action: CommandAction | Literal["policy"]
    target: str
    ok: bool
    message: str
    worker: WorkerView | None = None
    group: GroupView | None = None


class EventList(BaseModel):
    events: list[Event]
