"""plan(recipe): a pure, deterministic layout of nodes, GPUs, ports and process specs.

Packing: replicas are placed in recipe order (prefill, decode | workers). A replica spanning nodes takes
whole nodes: the head node while none of its GPUs is taken (unless ``router.dedicated_node``), then fresh
ones; a smaller one goes first-fit onto the lowest node with enough free GPUs. The head (Redis + router)
lives on node 0, alone when ``router.dedicated_node``.

Ports are unique across the whole plan, not per node: on test clusters every "node" is the same host, and a
unique range also keeps logs unambiguous. Layout from ``ports.base``: redis = base, control API = base + 1,
then per replica k a block of PORT_STRIDE starting at base + 10 + k*PORT_STRIDE: http, bootstrap (+2),
nccl (+5, SGLang binds it on 127.0.0.1 only), dist-init (+10; SGLang derives a few ports above it).
A single-node replica with DP attention gets the dist-init port too: without --dist-init-addr SGLang derives
its ZMQ ports from --port + 233 (ZMQ_TCP_PORT_DELTA), which lands in another replica's block.
"""

from __future__ import annotations

import sys

from hpcserve.engines.base import WorkerLaunch, get_engine
from hpcserve.errors import PlanError
from hpcserve.plan.model import NodeSpec, Plan, ProcessSpec, SlurmSpec, WorkerSpec
from hpcserve.plan.router_cmd import batch_spec, bench_spec, control_spec, listen_host, redis_spec, router_spec
from hpcserve.recipe.schema import GroupSpec, Recipe, replica_gpus
from hpcserve.stacks.base import get_stack

PORT_STRIDE = 20
NCCL_OFFSET = 5
ROLE_OF_GROUP = {"prefill": "prefill", "decode": "decode", "workers": "both"}
MODE_OF_ROLE = {"prefill": "prefill", "decode": "decode", "both": "null"}


class _Nodes:
    """GPU bookkeeping while packing."""

    def __init__(self, gpn: int):
        self.gpn = gpn
        self.free: list[list[int]] = []      # free GPU ids per node
        self.roles: list[list[str]] = []
        self.shared: list[bool] = []          # may host more single-node replicas

    def add(self, role: str | None, shared: bool) -> int:
        self.free.append(list(range(self.gpn)))
        self.roles.append([role] if role else [])
        self.shared.append(shared)
        return len(self.free) - 1

    def take_whole(self, role: str) -> int:
        """A whole node for one rank of a multi-node replica: the head node if it may share and is untouched."""
        for n, roles in enumerate(self.roles):
            if self.shared[n] and roles == ["head"] and len(self.free[n]) == self.gpn:
                self.shared[n], self.free[n] = False, []
                roles.append(role)
                return n
        n = self.add(role, shared=False)
        self.free[n] = []
        return n

    def take_gpus(self, role: str, count: int) -> tuple[int, list[int]]:
        for n, free in enumerate(self.free):
            if not self.shared[n]:
                continue
            if self.gpn == 0:
                # nothing to count: one replica per node (the head node may take the first one)
                if all(r == "head" for r in self.roles[n]):
                    return self._claim(n, role, 0)
            elif len(free) >= count:
                return self._claim(n, role, count)
        return self._claim(self.add(None, shared=True), role, count)

    def _claim(self, n: int, role: str, count: int) -> tuple[int, list[int]]:
        got, self.free[n] = self.free[n][:count], self.free[n][count:]
        if role not in self.roles[n]:
            self.roles[n].append(role)
        return n, got


def plan(recipe: Recipe, point: dict | None = None, python: str | None = None,
         shard: tuple[int, int] = (0, 1)) -> Plan:
    c = recipe.cluster
    stack = get_stack(recipe.stack)
    engine = get_engine(stack.engine_kind(recipe.engine.kind))
    hp_python = python or c.python or sys.executable
    nodes = _Nodes(c.gpus_per_node)
    head = nodes.add("head", shared=not recipe.router.dedicated_node)
    base = recipe.ports.base
    workers: list[WorkerSpec] = []
    procs: list[ProcessSpec] = []
    replica_index = 0
    for gname, group in recipe.groups().items():
        role = ROLE_OF_GROUP[gname]
        gpus = replica_gpus(group, c.gpus_per_node)
        for r in range(group.replicas):
            port = base + 10 + replica_index * PORT_STRIDE
            replica_index += 1
            wid = f"{gname}-{r}"
            if group.nodes > 1:
                placed = [(nodes.take_whole(role), list(range(c.gpus_per_node))) for _ in range(group.nodes)]
            else:
                placed = [nodes.take_gpus(role, gpus)]
            w = WorkerSpec(id=wid, group=gname, role=role, replica=r, nodes=[n for n, _ in placed], port=port,
                           bootstrap_port=port + 2 if role == "prefill" else None,
                           dist_init_port=port + 10 if group.nodes > 1 or group.dp_attention else None,
                           nccl_port=port + NCCL_OFFSET, gpus=gpus)
            workers.append(w)
            procs += _engine_processes(recipe, engine, stack, group, w, placed, hp_python)
    last_port = base + 10 + replica_index * PORT_STRIDE
    if last_port > 65535:
        raise PlanError(f"ports: {replica_index} replicas need ports up to {last_port}; lower ports.base")
    if base <= recipe.router.port < last_port:
        raise PlanError(f"router.port: {recipe.router.port} falls inside the worker port range "
                        f"{base}-{last_port - 1}; move router.port or ports.base")
    mode = "pd" if recipe.disaggregated else "aggregated"
    head_procs = []
    if recipe.redis.url is None:
        head_procs.append(redis_spec(head, base))
    head_procs.append(router_spec(recipe, head, mode, workers, hp_python, stack))
    control_port = base + 1 if recipe.router.kind == "hpcserve" and stack.steers_router else None   # steers ours only
    if control_port is not None:
        head_procs.append(control_spec(recipe, head, hp_python, control_port, point))
    if recipe.batch is not None:
        head_procs.append(batch_spec(recipe, head, hp_python, shard, stack.api))
    if recipe.benchmark is not None:
        # w.gpus already counts every node of a replica
        head_procs.append(bench_spec(recipe, head, hp_python, stack.api, sum(w.gpus for w in workers), point or {}))
    procs = head_procs + procs
    node_specs = [NodeSpec(index=i, roles=nodes.roles[i],
                           gpus_used=sorted(g for p in procs if p.node == i for g in p.gpus))
                  for i in range(len(nodes.free))]
    return Plan(
        name=recipe.name, mode=mode, stack=stack.name, engine=engine.name, backend=c.backend, point=point or {},
        num_nodes=len(node_specs), head_node=head, address=c.address, python=hp_python,
        nodes=node_specs, workers=workers, processes=procs, router_port=recipe.router.port,
        control_port=control_port, api_key_env=recipe.router.api_key_env,
        redis_port=None if recipe.redis.url else base, redis_url=recipe.redis.url,
        redis_password_env=recipe.redis.password_env, env=dict(recipe.env),
        startup_timeout=recipe.timeouts.startup, drain_timeout=recipe.timeouts.drain,
        slurm=_slurm(recipe, node_specs),
        batch_max_restarts=recipe.batch.max_restarts if recipe.batch else None,
        bind=listen_host(recipe), handover_seconds=recipe.serve.handover_seconds if recipe.serve.continuous else None,
        notes=_notes(recipe),
    )


def _notes(recipe: Recipe) -> list[str]:
    """Defaults of ours that differ from SGLang's own, said rather than silently applied."""
    out = []
    if recipe.disaggregated and "backend" not in recipe.kv_transfer.model_fields_set:
        out.append(f"kv_transfer.backend: {recipe.kv_transfer.backend} (hpcserve's default; SGLang's own default "
                   f"is mooncake, which also needs kv_transfer.ib_device); set kv_transfer.backend to choose")
    return out


def _engine_processes(recipe: Recipe, engine, stack, group: GroupSpec, w: WorkerSpec,
                      placed: list[tuple[int, list[int]]], hp_python: str) -> list[ProcessSpec]:
    python = hp_python if getattr(engine, "uses_hpcserve_python", False) else recipe.engine.python
    out = []
    for rank, (node, gpus) in enumerate(placed):
        launch = WorkerLaunch(
            model_path=recipe.model.path, served_name=recipe.model.served_name or recipe.model.path,
            mode=MODE_OF_ROLE[w.role], host=listen_host(recipe), port=w.port, tp=group.tp, dp=group.dp, ep=group.ep,
            nnodes=group.nodes, node_rank=rank,
            dist_init_addr=f"{{host:{placed[0][0]}}}:{w.dist_init_port}" if w.dist_init_port else None,
            bootstrap_port=w.bootstrap_port, nccl_port=w.nccl_port,
            transfer_backend=recipe.kv_transfer.backend if recipe.disaggregated else None,
            ib_device=recipe.kv_transfer.ib_device if recipe.disaggregated else None,
            user_args=dict(group.args), options=recipe.engine.options(), python=python)
        env = {**stack.worker_env(recipe, w, launch), **group.env}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        ports = {"http": w.port}
        if w.bootstrap_port:
            ports["bootstrap"] = w.bootstrap_port
        if w.dist_init_port:
            ports["dist_init"] = w.dist_init_port
        name = w.id if group.nodes == 1 else f"{w.id}-rank{rank}"
        out.append(ProcessSpec(
            name=name, kind="engine", node=node, argv=engine.argv(launch), env=env, gpus=gpus,
            # only rank 0 listens (HTTP, bootstrap, dist_init); other ranks connect to its dist_init port
            ports=ports if rank == 0 else {},
            log=f"logs/{name}.log", worker_id=w.id if rank == 0 else None, group=w.group, role=w.role,
            node_rank=rank, restart=group.restart if group.nodes == 1 else 0, critical=group.critical))
    return out


def _slurm(recipe: Recipe, node_specs: list[NodeSpec]) -> SlurmSpec:
    c = recipe.cluster
    # one agent step per node and Slurm's cgroups confine everything it starts: ask for its engines' share
    most_gpus = max((len(n.gpus_used) for n in node_specs), default=0)
    return SlurmSpec(
        job_name=recipe.name, nodes=len(node_specs), time=c.time,
        cpus_per_task=c.cpus_per_node or c.cpus_per_gpu * max(1, most_gpus), mem=c.mem_per_node,
        gpus_per_node=c.gpus_per_node if (c.request_gpus and c.gpus_per_node) else None,
        account=c.account, partition=c.partition, qos=c.qos, signal=f"USR2@{c.signal_seconds}",
        directives=list(c.sbatch) + (["--requeue"] if recipe.batch else []), setup=list(c.setup), container_runtime=c.container_runtime,
        container=recipe.engine.container, container_mounts=list(c.container_mounts),
        container_setup=list(recipe.engine.setup))
