"""`hpcserve node --plan plan.json --run-dir DIR [--node-rank N]`: the node agent.

Order on the head node: Redis, redis.json, router, engines; other nodes wait for redis.json. Every wait is
bounded. SIGTERM/SIGINT/SIGUSR2 drain and stop everything, exit 0. A fatal problem is written to
failure.json in the run dir (so `status` can say why) and the agent exits 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from hpcserve import aio, registry
from hpcserve.agent import hosts, redis_server, stages
from hpcserve.agent.handover import Handover
from hpcserve.agent.head import HeadWatch
from hpcserve.agent.preflight import preflight
from hpcserve.agent.procs import child_env, cpu_shares
from hpcserve.agent.supervisor import Managed, Supervisor
from hpcserve.cmdline.agent import AgentArgs
from hpcserve.containers.base import engine_command
from hpcserve.errors import HpcserveError, UsageError
from hpcserve.plan.model import Plan
from hpcserve.rundir import RunPaths, atomic_write, read_json

log = logging.getLogger("hpcserve.agent")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def node_rank(arg: int | None, nodes: int) -> int:
    """This node's index: --node-rank, else SLURM_NODEID; it must be one of the plan's (or sweep's) nodes."""
    rank = arg
    if rank is None:
        env = os.environ.get("SLURM_NODEID")
        if env is None:
            raise HpcserveError("no node rank: pass --node-rank N or run under srun (SLURM_NODEID)")
        rank = int(env)
    if not 0 <= rank < nodes:
        raise HpcserveError(f"node rank {rank} is outside the plan's {nodes} nodes (0-{nodes - 1});"
                            f" the job has more nodes than the plan: re-render")
    return rank


def _setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s node{rank} %(levelname)s %(message)s")
    root = logging.getLogger("hpcserve")
    root.setLevel(logging.INFO)
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "logs" / f"agent-node{rank}.log")):
        h.setFormatter(fmt)
        root.addHandler(h)


def record_failure(run_dir: Path, rank: int, message: str) -> None:
    """The first failure of this start of the job is the cause; later ones are consequences (a previous
    start's record, from before a requeue or a rerun in the same run dir, is replaced)."""
    if failed_now(run_dir) is None:
        atomic_write(RunPaths(run_dir) / RunPaths.FAILURE, json.dumps(
            {"node": rank, "message": message, "ts": time.time(), "epoch": hosts.epoch(),
             "job": stages.job_ref()}) + "\n")


def failed_now(run_dir: Path) -> dict | None:
    """failure.json of this start of the job (same epoch), else None."""
    fail = read_json(RunPaths(run_dir) / RunPaths.FAILURE)
    if not isinstance(fail, dict) or fail.get("epoch", hosts.epoch()) != hosts.epoch():
        return None
    return fail


def why_not_start(run_dir: Path, stop: "StopEvent") -> str | None:
    """Why this agent must start nothing now: it was told to stop, or another node already failed (its
    failure.json is the cause the user sees); None to go on."""
    if stop.is_set():
        return f"got {stop.signal_name}"
    return "another node failed" if failed_now(run_dir) is not None else None


async def _start_redis(plan: Plan, run_dir: Path, addr: str, managed: list[Managed]) -> str:
    if plan.redis_url:   # external Redis: publish it like our own so other nodes and `status` find it
        u = urlparse(plan.redis_url)
        password = None
        if plan.redis_password_env:
            password = os.environ.get(plan.redis_password_env)
            if not password:
                raise HpcserveError(f"redis.password_env: {plan.redis_password_env} is not set on the head node; "
                                    f"export it before submitting (sbatch passes the environment on)")
        url = redis_server.url_of(u.hostname or "", u.port or 6379, password, u.path.lstrip("/") or "0")
        redis_server.publish(run_dir, u.hostname or "", u.port or 6379, password, url)
        return url
    spec = next(p for p in plan.processes if p.kind == "redis")
    port = spec.ports["redis"]
    hosts.check_port_free(addr, port, "redis")
    password = redis_server.new_password()
    binary = redis_server.find_redis_server(os.environ.get("HPCSERVE_REDIS_SERVER"))
    conf = redis_server.write_conf(run_dir, hosts.fill([plan.bind], addr, {}, {})[0], port, password)
    m = Managed(spec, [binary, str(conf)], child_env(secrets=secret_names(plan)), run_dir, addr, plan.head_node)
    await m.start()
    managed.append(m)
    url = redis_server.url_of(addr, port, password)
    redis_server.publish(run_dir, addr, port, password, url)
    return url


# Processes that use the bearer key: the router checks it, the control API too, stages send it to the router.
_API_KEY_USERS = ("router", "control", "batch", "bench")


def secret_names(plan: Plan) -> frozenset[str]:
    """Environment variables holding secrets: the API key and the external Redis password (the agent reads
    that one itself and hands the router and stages a Redis URL instead)."""
    return frozenset(n for n in (plan.api_key_env, plan.redis_password_env) if n)


def managed_process(plan: Plan, spec, run_dir: Path, run_id: str, redis_url: str, addr: str,
                    addrs: dict[int, str], rank: int) -> Managed:
    """A plan process ready to start on this node: placeholders filled, environment built (the Redis URL with
    its password reaches the router and stages through the environment, never argv)."""
    extra = {"run_dir": str(run_dir), "run_id": run_id, "epoch": hosts.epoch()}   # epoch: this start of the job
    spec_env = dict(zip(spec.env, hosts.fill(list(spec.env.values()), addr, addrs, extra)))   # stacks' DYN_* too
    keep = frozenset([plan.api_key_env]) if plan.api_key_env and spec.kind in _API_KEY_USERS else frozenset()
    env = child_env(plan.env, spec_env, {"HPCSERVE_REDIS_URL": redis_url, "HPCSERVE_RUN_ID": run_id}
                    if spec.kind in ("router", "batch", "bench") else {}, secrets=secret_names(plan), keep=keep)
    argv = hosts.fill(spec.argv, addr, addrs, extra)
    stop_signal = signal.SIGTERM
    if spec.kind == "engine":   # only the engine runs inside the image, started through the runtime
        argv, stop_signal = engine_command(plan.slurm, spec.name, argv, env, rank,
                                           str(run_dir), os.environ.get("SLURMD_NODENAME"))
    m = Managed(spec, argv, env, run_dir, addr, rank)
    m.stop_signal = stop_signal
    if spec.kind == "engine":
        engines = {p.name: len(p.gpus) for p in plan.on_node(rank) if p.kind == "engine"}
        m.cpus = cpu_shares(engines, sorted(os.sched_getaffinity(0))).get(spec.name)
    return m


def check_model_paths(procs: list, rank: int) -> None:
    """An absolute model path must exist on the node: fail in seconds, not after a GPU-hour of queueing."""
    for p in procs:
        if p.kind == "engine" and "--model-path" in p.argv:
            mp = p.argv[p.argv.index("--model-path") + 1]
            if mp.startswith("/") and not os.path.exists(mp):
                raise HpcserveError(f"model path {mp} does not exist on node {rank} ({os.uname().nodename}); "
                                    f"fix model.path or the container mounts")


async def run_agent(plan: Plan, run_dir: Path, rank: int, run_id: str, stop: "StopEvent") -> int:
    is_head = rank == plan.head_node
    addr = hosts.resolve_address(plan.address)
    hosts.publish_address(run_dir, rank, addr)
    if is_head and stages.stage_specs(plan, rank) and stages.batch_already_complete(plan):
        stages.write_done(run_dir, "batch output already complete; nothing started")
        log.info("batch output already complete: starting nothing")
        return EXIT_OK
    check_model_paths(plan.on_node(rank), rank)
    await preflight(plan, run_dir, rank)   # hpcserve doctor's node checks, before anything starts
    # a node whose checks failed first ends the step (srun --kill-on-bad-exit): the SIGTERM may arrive while
    # this node's checks still run, and nothing may be started after it
    if why := why_not_start(run_dir, stop):
        log.info("not starting: %s", why)
        return EXIT_FAILED
    managed: list[Managed] = []
    startup = float(plan.startup_timeout)
    if is_head:
        url = await _start_redis(plan, run_dir, addr, managed)
    else:
        # give up at once when the head found nothing to run, another node failed (its failure.json is the
        # cause the user sees) or this agent is told to stop: waiting out the startup timeout helps nobody
        url = await redis_server.read_published(run_dir, startup, give_up=lambda: stages.done_now(run_dir) or
                                                why_not_start(run_dir, stop) is not None)
        if url is None and (why := why_not_start(run_dir, stop)):
            log.info("not starting: %s", why)
            return EXIT_FAILED
        if url is None:
            log.info("the head node found nothing to run; exiting")
            return EXIT_OK
    client = await redis_server.connect(url, timeout=min(30.0, startup))
    mine = [p for p in plan.on_node(rank) if p.kind != "redis"]
    addrs = await hosts.wait_addresses(run_dir, hosts.needed_hosts([p.argv for p in mine]) | {rank}, startup)
    hosts.check_ports_free(addr, mine)
    managed += [managed_process(plan, p, run_dir, run_id, url, addr, addrs, rank) for p in mine]
    if is_head:
        await registry.set_status(client, run_id, phase="starting", started_at=f"{time.time():.3f}")
    async with Supervisor(run_id, client, managed) as sup:
        for m in managed:   # stages (batch) wait for readiness
            if m.child is None and m.spec.kind not in stages.STAGE_KINDS:
                await m.start()
        sup.run()
        outcome = await _wait_outcome(plan, run_dir, run_id, client, addr, is_head, stop, sup)
        reason = outcome.get("failure")
        if reason:
            log.error("%s", reason)
            record_failure(run_dir, rank, reason)
        if is_head:
            if outcome.get("phase") == "done":
                stages.write_done(run_dir, outcome.get("why", "done"))
            try:
                await registry.set_status(client, run_id, phase="failed" if reason else outcome["phase"],
                                          reason=reason or "")
            except Exception:   # noqa: BLE001 - Redis may be the thing that failed
                pass
        log.info("stopping (%s)", reason and "failure" or outcome.get("why", stop.signal_name))
        if outcome.get("phase") == "draining":   # a stop signal: open streams finish first (timeouts.drain)
            await drain_requests(run_dir, sup, float(plan.drain_timeout))
        await sup.drain_and_stop(grace=min(10.0, plan.drain_timeout or 10.0), stage_grace=30.0)
        if is_head and not reason:
            batch = next((m for m in managed if m.spec.kind == "batch"), None)
            requeued = stages.requeue_if_allowed(plan, batch.exit_code if batch else None, stop.signal_name)
            RunPaths(run_dir).write(RunPaths.STOPPED, {
                "signal": stop.signal_name, "why": outcome.get("why"), "requeued": requeued,
                "batch_exit": batch.exit_code if batch else None, "ts": time.time(), "job": stages.job_ref()})
    await client.aclose()
    return EXIT_FAILED if reason else EXIT_OK


async def _wait_outcome(plan, run_dir, run_id, client, addr, is_head, stop, sup) -> dict:
    """Wait for whichever ends this agent first: a stop signal, a critical failure, the head's startup or
    critical-group verdict, the batch stage finishing, or (other nodes) the head declaring the job over."""
    waits: dict[asyncio.Future, str] = {asyncio.ensure_future(stop.wait()): "signal", sup.fatal: "fatal",
                                        sup.stage_exit: "stage",
                                        asyncio.ensure_future(_peer_failed(run_dir)): "peer"}
    if is_head:
        async def start_stages():
            for m in sup.managed:
                if m.spec.kind in stages.STAGE_KINDS and m.child is None and not m.stopping:
                    await m.start()
                    sup.add(m)
        head = HeadWatch(plan, run_dir, run_id, client, addr, on_ready=start_stages)
        waits[asyncio.ensure_future(head.run())] = "head"
        job = os.environ.get("SLURM_JOB_ID")
        if plan.handover_seconds and job:   # serve.continuous (the local backend has no time limit)
            waits[asyncio.ensure_future(Handover(run_dir, plan.handover_seconds, job).run())] = "handover"
    else:
        waits[asyncio.ensure_future(_job_over(client, run_id, run_dir))] = "over"
    done, _ = await asyncio.wait(list(waits), return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        if not w.done():
            w.cancel()
    fut = next(iter(done))
    kind = waits[fut]
    if kind == "fatal":
        return {"failure": fut.result()}
    if kind in ("head", "peer"):
        return {"failure": fut.result()}
    if kind == "stage":
        stage, code = fut.result()
        failure = stages.stage_failure(stage, code)
        if failure:   # a stage that gave up often only reports a consequence: name the workers that died
            dead = await _dead_workers(client, run_id)
            return {"failure": failure + (f" (dead workers: {dead})" if dead else "")}
        return {"phase": "done", "why": f"{stage} complete"}
    if kind == "over":
        return {"phase": "done", "why": f"head node says {fut.result()}"}
    if kind == "handover":
        return {"phase": "done", "why": fut.result()}
    return {"phase": "draining", "why": stop.signal_name}


async def drain_requests(run_dir: Path, sup: Supervisor, timeout: float, poll: float = 0.25) -> None:
    """Before any engine stops: mark this node's workers draining (the router sends them no new work) and
    wait until the router has no request in flight, for at most ``timeout`` seconds. Every node waits on the
    same router (endpoint.json), so engines on other nodes do not cut the streams it relays either."""
    for m in sup.managed:
        if m.is_worker and m.state not in ("dead", "draining"):
            m.state = "draining"
            try:
                await sup.publish(m)
            except Exception:   # noqa: BLE001 - Redis may be gone; the wait below still bounds the drain
                pass
    ep = read_json(RunPaths(run_dir) / RunPaths.ENDPOINT)
    if not isinstance(ep, dict) or not ep.get("host") or not ep.get("port"):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        n = await router_inflight(ep["host"], int(ep["port"]))
        if not n:   # 0, or the router is gone
            return
        await asyncio.sleep(poll)
    log.warning("drain: requests still in flight after timeouts.drain=%.0fs; stopping anyway", timeout)


async def router_inflight(host: str, port: int, timeout: float = 2.0) -> int | None:
    """hpcserve_router_inflight_requests from the router's /metrics; None when it does not answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            body = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
    except (OSError, asyncio.TimeoutError):
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("hpcserve_router_inflight_requests "):
            return int(float(line.split()[1]))
    return None


async def _dead_workers(client, run_id: str, timeout: float = 2.0) -> str:
    """"ID on node N, ..." for the registry's dead workers; "" when none or Redis does not answer in time."""
    try:
        recs = await asyncio.wait_for(registry.load_workers(client, run_id), timeout)
    except Exception:   # noqa: BLE001 - Redis may be what failed; the stage's own reason stands
        return ""
    return ", ".join(f"{w} on node {r.node}" for w, r in sorted(recs.items()) if r.state == "dead")


async def _peer_failed(run_dir: Path, interval: float = 0.5) -> str:
    """Another node recorded the job's failure in the shared run dir: this node ends too. The file outlives
    Redis, which the head stops within a second of failing (too fast for a poll of the phase alone)."""
    while True:
        await asyncio.sleep(interval)
        fail = failed_now(run_dir)
        if fail:
            return f"node {fail.get('node')} failed: {fail.get('message')}"


async def _job_over(client, run_id: str, run_dir: Path, interval: float = 0.5) -> str:
    """Other nodes follow the head: when it marks the job done or failed (done.json in the shared run dir,
    or the phase in Redis), they stop too."""
    while True:
        await asyncio.sleep(interval)
        if stages.done_now(run_dir):
            return "done"
        try:
            phase = await client.hget(registry.status_key(run_id), "phase")
        except Exception:   # noqa: BLE001 - Redis blip; keep serving
            continue
        if phase in (b"done", b"failed"):
            return phase.decode()


class StopEvent(asyncio.Event):
    """Set by SIGTERM/SIGINT/SIGUSR2; remembers which (USR2 = time limit or preemption is coming)."""

    signal_name = "none"

    def on_signal(self, sig: int) -> None:
        if not self.is_set():
            self.signal_name = signal.Signals(sig).name
            log.info("got %s: draining", self.signal_name)
        self.set()


def main(argv: list[str] | None = None) -> int:
    try:
        args = AgentArgs.from_argv(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"error: {e} (see hpcserve node --help)", file=sys.stderr)
        return EXIT_USAGE
    if args.sweep is not None:
        from hpcserve.agent.sweep import main as sweep_main
        return sweep_main(Path(args.sweep), args.node_rank, args.run_id)
    if args.plan is None:
        print("error: give --plan PLAN.json (or --sweep RUN_DIR)", file=sys.stderr)
        return EXIT_USAGE
    plan_path = Path(args.plan)
    try:
        plan = Plan.from_json(plan_path.read_bytes())
    except OSError as e:
        print(f"error: cannot read plan {plan_path}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    run_dir = Path(args.run_dir or plan_path.parent).resolve()
    try:
        rank = node_rank(args.node_rank, plan.num_nodes)
    except HpcserveError as e:
        print(f"error: {e}", file=sys.stderr)
        record_failure(run_dir, -1, str(e))
        return EXIT_USAGE
    _setup_logging(run_dir, rank)
    run_id = args.run_id or run_dir.name
    return aio.run(_amain(plan, run_dir, rank, run_id))


async def _amain(plan: Plan, run_dir: Path, rank: int, run_id: str) -> int:
    stop = StopEvent()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        loop.add_signal_handler(sig, stop.on_signal, sig)
    try:
        return await run_agent(plan, run_dir, rank, run_id, stop)
    except HpcserveError as e:
        log.error("%s", e)
        record_failure(run_dir, rank, str(e))
        return EXIT_FAILED
