"""The Plan: everything that will run, where, on which GPUs and ports. Pure data, serialised to plan.json.

Host names are not known when planning; argv strings carry placeholders the node agent fills at run time:
``{addr}`` this node's address, ``{host:N}`` the address of node N, ``{run_dir}``, ``{run_id}``.
"""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict

ProcessKind = Literal["engine", "redis", "router", "control", "batch", "bench"]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProcessSpec(Frozen):
    name: str
    kind: ProcessKind
    node: int
    argv: list[str]
    env: dict[str, str] = {}
    gpus: list[int] = []
    ports: dict[str, int] = {}       # ports this process listens on (checked free before it starts)
    log: str
    worker_id: str | None = None     # set on the process that serves a worker's HTTP (rank 0)
    group: str | None = None
    role: str | None = None          # prefill | decode | both
    node_rank: int = 0
    restart: int = 0                 # restarts allowed before the process is given up
    critical: bool = False           # losing it ends the job


class WorkerSpec(Frozen):
    id: str
    group: str
    role: str
    replica: int
    nodes: list[int]
    port: int
    bootstrap_port: int | None = None
    dist_init_port: int | None = None
    nccl_port: int | None = None
    gpus: int                        # GPUs of the whole replica, over all its nodes


class NodeSpec(Frozen):
    index: int
    roles: list[str]
    gpus_used: list[int]


class SlurmSpec(Frozen):
    job_name: str
    nodes: int
    time: str
    gpus_per_node: int | None
    account: str | None
    partition: str | None
    qos: str | None
    signal: str
    directives: list[str]
    setup: list[str]
    container_runtime: str
    container: str | None
    container_mounts: list[str]
    container_setup: list[str] = []   # engine.setup: shell lines run inside the engine's image before it
    array: int | None = None          # job array size: task i runs the plan in shard-000i/
    cpus_per_task: int | None = None  # CPU cores of each node's agent step (its engines share them)
    mem: str | None = None            # memory of each node's agent step (Slurm units; 0: the whole node's)


class Plan(Frozen):
    version: int = 1
    name: str
    mode: Literal["pd", "aggregated"]
    stack: str = "sglang"             # hpcserve/stacks/ registry name: what fronts the workers
    engine: str
    backend: str
    point: dict = {}
    num_nodes: int
    head_node: int = 0
    address: str
    python: str
    nodes: list[NodeSpec]
    workers: list[WorkerSpec]
    processes: list[ProcessSpec]
    router_port: int
    control_port: int | None = None  # the head node's control API (hpcserve router only): ports.base + 1
    api_key_env: str | None = None   # env var holding the bearer key of the router and the control API
    redis_port: int | None
    redis_url: str | None = None     # external Redis (never with a password: the schema refuses one)
    redis_password_env: str | None = None     # env var the agent reads the external Redis password from
    env: dict[str, str]
    startup_timeout: int
    drain_timeout: int
    slurm: SlurmSpec
    batch_max_restarts: int | None = None     # set when the plan runs an offline batch stage
    bind: str = "{addr}"              # what servers listen on: the node's address, or 0.0.0.0 (serve.bind: all)
    handover_seconds: int | None = None       # serve.continuous: successor submitted this long before the limit
    notes: list[str] = []            # defaults worth saying (validate/render print them), e.g. the KV backend

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Plan":
        return cls.model_validate(orjson.loads(raw))

    def on_node(self, node: int) -> list[ProcessSpec]:
        return [p for p in self.processes if p.node == node]

    @property
    def endpoint_port(self) -> int:
        return self.router_port
