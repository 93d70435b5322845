"""`hpcserve node --sweep RUN_DIR [--node-rank N]`: one node agent walking every point of a sweep inside one
allocation, restarting only what changes between points.

One agent per node of the allocation (the largest point's node count) runs for the whole sweep. Redis lives
for the whole sweep on the head node; the registry uses one run id (the sweep dir's name), so workers that
stay are never re-registered and the router's ``--run-id`` does not change. For each point, in order:

1. each agent compares the point's process specs on its node with what runs there: a process whose spec
   (argv with its placeholders, env, ports, GPUs, node) and the plan's env are unchanged keeps running;
   everything else is deregistered and stopped. Nodes beyond the point's node count stop everything.
2. barrier: no agent starts anything before every agent has stopped what changes (ports may be shared).
3. each agent starts its new processes; the head watches readiness (HeadWatch, as for one deployment),
   then runs the point's benchmark stage into the point's dir.
4. the point ends when the stage ends, or fails (startup timeout, a worker died during startup, a critical
   group lost, a process that cannot start): failure.json goes into that point's dir, the sweep goes on.

Files: per point ``sweep-nodeN.json`` (kept/stopped/started processes and their PIDs), done.json or
failure.json, endpoint.json, bench/; in the sweep dir ``sweep/`` (barriers, point ends, result.json) and
logs/agent-nodeN.log. A stop signal (scancel, time limit) on any agent drains every agent and ends the sweep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from hpcserve import aio, registry
from hpcserve.agent import hosts, redis_server, stages
from hpcserve.agent.head import HeadWatch
from hpcserve.agent.main import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, StopEvent, _setup_logging, _start_redis,
                                 check_model_paths, managed_process, record_failure)
from hpcserve.agent.main import node_rank as rank_of
from hpcserve.agent.preflight import preflight
from hpcserve.agent.supervisor import Managed, Supervisor
from hpcserve.agent.sweep_sync import (Barrier, mark_point_end, point_end, read_points, sync_dir, wait_point_end,
                                       write_node_record)
from hpcserve.errors import HpcserveError
from hpcserve.plan.model import Plan, ProcessSpec
from hpcserve.rundir import RunPaths, atomic_write

log = logging.getLogger("hpcserve.agent")
STOP_JSON = "stop.json"
STOP_ORDER = {"bench": 0, "batch": 0, "engine": 1, "router": 2, "control": 2}   # redis lives for the whole sweep


@dataclass
class Point:
    index: int
    dir: Path
    plan: Plan

    @property
    def name(self) -> str:
        return self.dir.name


def load_points(top: Path) -> list[Point]:
    points = []
    for i, d in enumerate(read_points(top)):
        try:
            points.append(Point(i, d, Plan.from_json((d / RunPaths.PLAN).read_bytes())))
        except OSError as e:
            raise HpcserveError(f"cannot read {d / 'plan.json'}: {e.strerror}; re-render the sweep") from None
    if not points:
        raise HpcserveError(f"{top}/sweep.json lists no points; re-render the sweep")
    return points


# Read by the supervisor only when a process fails: a point that changes just these keeps the process and
# hands it the new values.
FOLLOWS_POINT = {"restart", "critical"}


def spec_key(plan: Plan, spec: ProcessSpec) -> bytes:
    """Everything that reaches a process. Placeholders ({addr}, {host:N}, {run_id}) stand for values fixed for
    the whole sweep and {run_dir} only for per-point paths, so comparing unfilled specs is comparing processes."""
    return orjson.dumps([spec.model_dump(mode="json", exclude=FOLLOWS_POINT), plan.env], option=orjson.OPT_SORT_KEYS)


def _alive(m: Managed) -> bool:
    return m.child is not None and m.child.running and m.state != "dead" and not m.stopping


class SweepAgent:
    def __init__(self, top: Path, points: list[Point], rank: int, run_id: str, stop: StopEvent):
        self.top, self.points, self.rank, self.run_id, self.stop = top, points, rank, run_id, stop
        self.nodes = max(p.plan.num_nodes for p in points)
        self.is_head = rank == points[0].plan.head_node
        self.barrier = Barrier(top, self.nodes, rank)
        self.running: dict[str, tuple[bytes, Managed]] = {}   # spec name -> (spec key, process)
        self.base: list[Managed] = []                          # Redis (head only)
        self.env_keys = {k for p in points for k in p.plan.env}
        self.current: Point = points[0]
        self.results: list[dict] = []
        self.addr = self.url = ""
        self.addrs: dict[int, str] = {}
        self.client = None
        self.stop_followed = False   # the stop came from another agent's stop.json

    # -- the walk -------------------------------------------------------------------------------------------
    async def run(self) -> int:
        first = self.points[0].plan
        startup = float(max(p.plan.startup_timeout for p in self.points))
        helpers: list[asyncio.Task] = []
        try:
            self.addr = hosts.resolve_address(first.address)
            hosts.publish_address(self.top, self.rank, self.addr)
            # hpcserve doctor's node checks once, on the point that uses the most nodes, before anything starts
            await preflight(max((p.plan for p in self.points), key=lambda p: p.num_nodes), self.top, self.rank)
            if self.is_head:
                self.url = await _start_redis(first, self.top, self.addr, self.base)
            else:
                self.url = await redis_server.read_published(self.top, startup)
            self.client = await redis_server.connect(self.url, timeout=min(30.0, startup))
            self.addrs = await hosts.wait_addresses(self.top, set(range(self.nodes)), startup)
            helpers = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._follow_stop())]
            for pt in self.points:
                if self.stop.is_set():
                    break
                self.current = pt
                await self._point(pt)
        finally:
            self._announce_stop()
            await aio.cancel_and_wait(helpers)
            await self._stop_all()
            if self.client is not None:
                await self.client.aclose()
        if self.is_head:
            atomic_write(sync_dir(self.top) / "result.json", json.dumps(
                {"points": self.results, "stopped": self.stop.signal_name if self.stop.is_set() else None},
                indent=1) + "\n")
        return EXIT_OK

    async def _point(self, pt: Point) -> None:
        t0 = time.monotonic()
        plan = pt.plan
        want = {s.name: s for s in plan.on_node(self.rank) if s.kind not in ("redis", *stages.STAGE_KINDS)}
        keys = {n: spec_key(plan, s) for n, s in want.items()}
        retire = [n for n, (k, m) in self.running.items() if keys.get(n) != k or not _alive(m)]
        await self._retire(retire)
        for n, (_, m) in self.running.items():
            m.spec = want[n]  # the same process; its restart budget and criticality follow the point
        self._publish_files(pt)
        if not await self.barrier.wait(f"{pt.index:04d}-stopped", plan.startup_timeout + 60.0, self.stop):
            return self._stopped(pt)
        kept = sorted(self.running)
        started, failure = [], None
        try:
            new = [s for n, s in want.items() if n not in self.running]
            check_model_paths(new, self.rank)
            hosts.check_ports_free(self.addr, new)
            for s in new:
                m = self._managed(pt, s)
                await m.start()
                self.running[s.name] = (keys[s.name], m)
                started.append(s.name)
        except HpcserveError as e:
            failure = str(e)
        record = {"point": pt.name, "kept": kept, "stopped": sorted(retire), "started": started,
                  "pids": {n: m.child.pid for n, (_, m) in self.running.items()} |
                  {m.spec.name: m.child.pid for m in self.base},
                  "logs": {n: str(m.run_dir / m.spec.log) for n, (_, m) in self.running.items()},
                  "transition_seconds": round(time.monotonic() - t0, 3)}
        write_node_record(pt.dir, self.rank, record)
        log.info("point %s: kept %s, stopped %s, started %s", pt.name, kept or "-", sorted(retire) or "-",
                 started or "-")
        if failure:
            outcome = {"ok": False, "why": failure}
        else:
            outcome = await self._serve_point(pt)
        self._finish_point(pt, outcome)

    async def _serve_point(self, pt: Point) -> dict:
        """Supervise this node's processes until the point ends; the head runs readiness and the stage."""
        stage = [self._managed(pt, s) for s in pt.plan.on_node(self.rank) if s.kind in stages.STAGE_KINDS]
        managed = self.base + [m for _, m in self.running.values()] + stage
        if self.is_head:
            await self._status(phase="starting", point=pt.name)
        sup = await Supervisor(self.run_id, self.client, managed).__aenter__()
        try:
            sup.run()
            waits: dict[asyncio.Future, str] = {
                asyncio.ensure_future(self.stop.wait()): "signal", sup.fatal: "fatal", sup.stage_exit: "stage",
                asyncio.ensure_future(wait_point_end(self.top, pt.index)): "end"}
            if self.is_head:
                async def start_stage():
                    await self._status(phase="ready", point=pt.name)
                    for m in stage:
                        await m.start()
                        sup.add(m)
                watch = HeadWatch(pt.plan, pt.dir, self.run_id, self.client, self.addr, on_ready=start_stage)
                waits[asyncio.ensure_future(watch.run())] = "head"
            done, _ = await asyncio.wait(list(waits), return_when=asyncio.FIRST_COMPLETED)
            fut = next(iter(done))
            await aio.cancel_and_wait([w for w in waits if w is not fut])
            kind = waits[fut]
            await asyncio.gather(*(m.stop(30.0) for m in stage))
        finally:
            await sup.__aexit__(None, None, None)
        if kind == "signal":
            return {"signal": self.stop.signal_name}
        if kind == "end":
            info = fut.result()
            return {"ok": info["ok"], "why": f"node {info['node']}: {info['why']}", "followed": True}
        if kind == "stage":
            code = fut.result()[1]
            failure = stages.stage_failure(fut.result()[0], code)
            return {"ok": False, "why": failure} if failure else {"ok": True, "why": "bench complete"}
        return {"ok": False, "why": fut.result()}   # fatal (a critical process died) or the head's verdict

    def _finish_point(self, pt: Point, outcome: dict) -> None:
        if "signal" in outcome:
            self._stopped(pt)
            return
        if not outcome.get("followed"):
            if not outcome["ok"]:
                log.error("point %s failed: %s", pt.name, outcome["why"])
                record_failure(pt.dir, self.rank, outcome["why"])
            mark_point_end(self.top, pt.index, self.rank, outcome["ok"], outcome["why"])
        if self.is_head:
            ok = point_end(self.top, pt.index) or outcome
            if ok["ok"]:
                stages.write_done(pt.dir, outcome["why"])
            self.results.append({"point": pt.name, "ok": ok["ok"], "why": ok["why"]})
            log.info("point %s %s", pt.name, "done" if ok["ok"] else "FAILED")

    def _stopped(self, pt: Point) -> None:
        self._announce_stop()
        if self.is_head:
            atomic_write(pt.dir / RunPaths.STOPPED, json.dumps(
                {"signal": self.stop.signal_name, "why": "sweep stopped", "ts": time.time()}) + "\n")

    # -- processes ------------------------------------------------------------------------------------------
    def _managed(self, pt: Point, spec: ProcessSpec) -> Managed:
        m = managed_process(pt.plan, spec, pt.dir, self.run_id, self.url, self.addr, self.addrs, self.rank)
        for k in self.env_keys - pt.plan.env.keys() - spec.env.keys():   # set by another point only
            m.env.pop(k, None)
        return m

    async def _retire(self, names: list[str]) -> None:
        """Deregister and stop processes that change: stages, then engines, then the router."""
        ms = [self.running.pop(n)[1] for n in names]
        for m in ms:
            m.stopping = True
            if m.is_worker:
                try:
                    await registry.remove_worker(self.client, self.run_id, m.spec.worker_id)
                except Exception as e:   # noqa: BLE001 - the new point re-registers; log and go on
                    log.warning("deregistering %s failed: %s", m.spec.worker_id, type(e).__name__)
        for rank in sorted(set(STOP_ORDER.values())):
            await asyncio.gather(*(m.stop(10.0) for m in ms if STOP_ORDER[m.spec.kind] == rank))

    async def _stop_all(self) -> None:
        """End of the sweep: drain and stop everything; the head stops Redis after the others are done."""
        others = [m for _, m in self.running.values()]
        self.running.clear()
        async with Supervisor(self.run_id, self.client, others) as sup:
            await sup.drain_and_stop(grace=10.0)
        if not self.base:
            self.barrier.arrive("final")
            return
        await self._status(phase="done")
        if not self.stop.is_set():
            try:
                await self.barrier.wait("final", 30.0, self.stop)
            except HpcserveError as e:
                log.warning("%s", e)
        for m in self.base:
            await m.stop(10.0)

    async def _heartbeat(self) -> None:
        """Workers that stay keep their heartbeat between points, when no Supervisor runs."""
        while True:
            ids = [m.spec.worker_id for _, m in self.running.values() if m.is_worker and _alive(m)]
            try:
                if ids:
                    await registry.heartbeat(self.client, self.run_id, ids, 5.0)
            except Exception as e:   # noqa: BLE001 - Redis blip; the Supervisor re-registers
                log.debug("heartbeat failed: %s", e)
            await asyncio.sleep(1.0)

    def _announce_stop(self) -> None:
        """A stop signal on one agent stops them all (it could not join the next barrier anyway)."""
        if self.stop.is_set() and not self.stop_followed:
            sync_dir(self.top).mkdir(parents=True, exist_ok=True)
            atomic_write(sync_dir(self.top) / STOP_JSON, json.dumps(
                {"epoch": hosts.epoch(), "node": self.rank, "signal": self.stop.signal_name}) + "\n")

    async def _follow_stop(self) -> None:
        path = sync_dir(self.top) / STOP_JSON
        while not self.stop.is_set():
            try:
                info = json.loads(path.read_text())
                if info.get("epoch") == hosts.epoch():
                    self.stop_followed = True
                    self.stop.signal_name = f"{info['signal']} on node {info['node']}"
                    self.stop.set()
                    return
            except (OSError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.3)

    def _publish_files(self, pt: Point) -> None:
        """Per-point copies of redis.json and this node's address, for tools pointed at a point's dir."""
        hosts.publish_address(pt.dir, self.rank, self.addr)
        if self.is_head:
            src = self.top / RunPaths.REDIS
            atomic_write(pt.dir / RunPaths.REDIS, src.read_bytes(), mode=0o600)

    async def _status(self, **fields) -> None:
        try:
            await registry.set_status(self.client, self.run_id, **fields)
        except Exception:   # noqa: BLE001 - status is informative only
            pass


def main(top: Path, node_rank: int | None = None, run_id: str | None = None) -> int:
    """Entry point of `hpcserve node --sweep RUN_DIR`."""
    top = top.resolve()
    try:
        points = load_points(top)
        rank = rank_of(node_rank, max(p.plan.num_nodes for p in points))
    except HpcserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(top, rank)
    return aio.run(_amain(top, points, rank, run_id or top.name))


async def _amain(top: Path, points: list[Point], rank: int, run_id: str) -> int:
    stop = StopEvent()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        loop.add_signal_handler(sig, stop.on_signal, sig)
    agent = SweepAgent(top, points, rank, run_id, stop)
    try:
        return await agent.run()
    except HpcserveError as e:
        log.error("%s", e)
        record_failure(agent.current.dir, rank, str(e))
        return EXIT_FAILED
