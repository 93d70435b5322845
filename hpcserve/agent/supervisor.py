"""Supervision of one planned process: start, health-probe to ready, register, restart with backoff or
give up and mark dead. Workers (engine processes that serve HTTP) are mirrored into the Redis registry."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import aiohttp

from hpcserve import aio, registry
from hpcserve.agent import procs
from hpcserve.errors import BackendError
from hpcserve.plan.model import ProcessSpec

log = logging.getLogger("hpcserve.agent")
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5, connect=2)


class Managed:
    """One process of the plan on this node and its lifecycle state."""

    def __init__(self, spec: ProcessSpec, argv: list[str], env: dict[str, str], run_dir: Path, addr: str,
                 node: int):
        self.spec, self.argv, self.env, self.run_dir, self.addr, self.node = spec, argv, env, run_dir, addr, node
        self.child: procs.Child | None = None
        self.restarts = 0
        self.state = "starting"
        self.started_at = 0.0
        self.exit_code: int | None = None
        self.stopping = False
        self.rotation = True              # an operator may take a worker out of rotation (control API)
        self.operator_restart = False     # the current exit was asked for: restart at once, outside the budget
        self.stop_signal = int(signal.SIGTERM)   # the container runtime may relay another one (pyxis: USR1)
        self.cpus: list[int] | None = None       # an engine's share of the step's cores (procs.cpu_shares)

    @property
    def is_worker(self) -> bool:
        return self.spec.worker_id is not None

    @property
    def health_url(self) -> str | None:
        if self.spec.kind == "engine" and self.is_worker:
            return f"http://{self.addr}:{self.spec.ports['http']}/health"
        if self.spec.kind in ("router", "control"):
            return f"http://{self.addr}:{self.spec.ports[self.spec.kind]}/health"
        return None

    def record(self) -> registry.WorkerRecord:
        s = self.spec
        return registry.WorkerRecord(
            id=s.worker_id, role=s.role, group=s.group, url=f"http://{self.addr}:{s.ports['http']}",
            bootstrap_port=s.ports.get("bootstrap"), node=self.node, host=self.addr, state=self.state,
            started_at=self.started_at, restarts=self.restarts, rotation=self.rotation)

    async def start(self) -> None:
        self.state = "starting"
        self.started_at = time.time()
        self.child = await procs.spawn(self.spec.name, self.argv, self.env, self.run_dir / self.spec.log,
                                       self.run_dir, cpus=self.cpus)
        log.info("started %s (pid %d)%s", self.spec.name, self.child.pid,
                 f" restart {self.restarts}" if self.restarts else "")

    async def stop(self, grace: float = 10.0) -> None:
        self.stopping = True
        if self.child is not None and self.exit_code is None:
            self.exit_code = await procs.stop(self.child, grace, self.stop_signal)


class Supervisor:
    """Runs the loops of one node: exits/restarts, health probes, heartbeats."""

    def __init__(self, run_id: str, redis, managed: list[Managed], hb_interval: float = 1.0, hb_ttl: float = 5.0):
        self.run_id, self.redis, self.managed = run_id, redis, managed
        self.hb_interval, self.hb_ttl = hb_interval, hb_ttl
        self.fatal: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stage_exit: asyncio.Future = asyncio.get_running_loop().create_future()   # (stage kind, exit code)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Supervisor":
        self._session = aiohttp.ClientSession(timeout=PROBE_TIMEOUT)
        return self

    async def __aexit__(self, *exc) -> None:
        await aio.cancel_and_wait(self._tasks)   # once is not always enough: see aio.cancel_and_wait
        if self._session:
            await self._session.close()

    async def publish(self, m: Managed) -> None:
        if m.is_worker:
            try:
                await registry.publish_worker(self.redis, self.run_id, m.record(), hb_ttl=self.hb_ttl)
            except Exception as e:   # noqa: BLE001 - Redis away: the heartbeat loop re-registers later
                log.warning("registry write for %s failed: %s", m.spec.name, type(e).__name__)

    async def event(self, kind: str, **fields) -> None:
        try:
            await registry.emit_event(self.redis, self.run_id, kind, **fields)
        except Exception:   # noqa: BLE001 - events are best effort
            pass

    def run(self) -> None:
        for m in self.managed:
            if m.child is not None:
                self.add(m)
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        if any(m.is_worker for m in self.managed):
            self._tasks.append(asyncio.create_task(self._commands(), name="commands"))

    def add(self, m: Managed) -> None:
        """Watch a started process (stages are started later than the rest)."""
        self._tasks.append(asyncio.create_task(self._watch(m), name=f"watch-{m.spec.name}"))

    async def _probe(self, url: str) -> bool:
        try:
            async with self._session.get(url) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _watch(self, m: Managed) -> None:
        """Probe until ready, then wait for exit; restart within the budget, else mark dead."""
        while True:
            await self.publish(m)
            exited = asyncio.create_task(m.child.proc.wait())
            if m.health_url:
                while not exited.done():
                    if await self._probe(m.health_url):
                        m.state = "ready"
                        log.info("%s ready", m.spec.name)
                        await self.publish(m)
                        await self.event("ready", worker=m.spec.worker_id or m.spec.name, node=m.node)
                        break
                    await asyncio.wait([exited], timeout=0.3)
            else:
                m.state = "ready"
            code = await exited
            if m.stopping:
                return
            if m.operator_restart:   # asked for through the control API: not a failure, no backoff
                m.operator_restart = False
                m.restarts += 1
                await m.start()
                await self.event("restart", process=m.spec.name, attempt=m.restarts, by="operator")
                continue
            if m.spec.kind in ("batch", "bench"):   # a stage ends the job when it ends; never restarted
                m.exit_code = code
                if not self.stage_exit.done():
                    self.stage_exit.set_result((m.spec.kind, code))
                return
            log.warning("%s exited with code %s (see %s)", m.spec.name, code, m.spec.log)
            await self.event("exit", process=m.spec.name, code=code)
            if m.restarts >= m.spec.restart:
                m.state = "dead"
                await self.publish(m)
                await self.event("dead", process=m.spec.name, restarts=m.restarts)
                if m.spec.critical and not self.fatal.done():
                    self.fatal.set_result(f"{m.spec.name} died (exit {code}) after {m.restarts} restarts")
                return
            delay = min(0.5 * 2 ** m.restarts, 30.0)
            m.restarts += 1
            m.state = "starting"
            await self.publish(m)
            await asyncio.sleep(delay)
            if m.stopping:
                return
            try:
                await m.start()
            except BackendError as e:
                log.error("%s", e)
                m.state = "dead"
                await self.publish(m)
                return
            await self.event("restart", process=m.spec.name, attempt=m.restarts)

    async def apply(self, cmd: registry.Command) -> bool:
        """Carry out an operator command for one of this node's workers; False if it is not ours."""
        m = next((m for m in self.managed if m.spec.worker_id == cmd.worker), None)
        if m is None or m.stopping:
            return False
        log.info("operator: %s %s", cmd.action, cmd.worker)
        if cmd.action == "restart":
            if m.child is not None and m.child.running:
                m.operator_restart = True
                m.rotation, m.state = True, "starting"
                await self.publish(m)   # out of the router's rotation before the process goes
                await procs.stop(m.child, 10.0, m.stop_signal)
            return True
        if cmd.action == "drain" and m.state == "ready":
            m.state, m.rotation = "draining", False
        elif cmd.action == "rotate_out":
            m.rotation = False
        elif cmd.action == "rotate_in":
            m.rotation = True
            if m.state == "draining":
                m.state = "ready"
        await self.publish(m)
        return True

    async def _commands(self) -> None:
        """Follow the control API's commands channel (reconnecting while Redis is away)."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(registry.commands_channel(self.run_id))
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        cmd = registry.Command.model_validate_json(msg["data"])
                    except ValueError:
                        log.warning("ignoring an unreadable command: %r", msg["data"][:200])
                        continue
                    await self.apply(cmd)
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 - Redis away: subscribe again shortly
                log.debug("commands channel: %s", e)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:   # noqa: BLE001
                    pass

    async def _heartbeat(self) -> None:
        """TTL heartbeats; re-registers workers whose record vanished (e.g. Redis restarted)."""
        workers = [m for m in self.managed if m.is_worker]
        key = registry.workers_key(self.run_id)
        while True:
            live = [m for m in workers if m.state != "dead"]
            try:
                if live:
                    await registry.heartbeat(self.redis, self.run_id, [m.spec.worker_id for m in live], self.hb_ttl)
                    present = await self.redis.hmget(key, [m.spec.worker_id for m in live])
                    for m, rec in zip(live, present):
                        if rec is None:
                            await self.publish(m)
            except Exception as e:   # noqa: BLE001 - keep beating; Redis may come back
                log.debug("heartbeat failed: %s", e)
            await asyncio.sleep(self.hb_interval)

    async def drain_and_stop(self, grace: float, stage_grace: float = 30.0) -> None:
        """Mark workers draining, stop engines, then the router, then Redis; deregister workers."""
        for m in self.managed:
            m.stopping = True
            if m.is_worker and m.state != "dead":
                m.state = "draining"
                await self.publish(m)
        order = {"batch": 0, "bench": 0, "engine": 1, "router": 2, "control": 2, "redis": 3}
        for rank in sorted(set(order.values())):
            group = [m for m in self.managed if order[m.spec.kind] == rank]
            if rank == 3:
                for m in self.managed:
                    if m.is_worker:
                        try:
                            await registry.remove_worker(self.redis, self.run_id, m.spec.worker_id)
                        except Exception:   # noqa: BLE001 - Redis may already be gone
                            pass
            await asyncio.gather(*(m.stop(stage_grace if rank == 0 else grace) for m in group))
