"""What only the head node's agent watches: deployment readiness (-> endpoint.json, phase ready), the startup
deadline, and whole-group loss for critical groups. ``run()`` returns a failure reason, or never returns."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import aiohttp

from hpcserve import registry
from hpcserve.agent import handover
from hpcserve.plan.model import Plan
from hpcserve.rundir import RunPaths, atomic_write
from hpcserve.stacks.base import get_stack

log = logging.getLogger("hpcserve.agent")


class HeadWatch:
    def __init__(self, plan: Plan, run_dir: Path, run_id: str, redis, addr: str, interval: float = 0.25,
                 on_ready=None):
        self.plan, self.run_dir, self.run_id, self.redis, self.addr = plan, run_dir, run_id, redis, addr
        self.on_ready = on_ready
        self.interval = interval
        self.router_url = f"http://{addr}:{plan.router_port}"
        self.stack = get_stack(plan.stack)

    async def _router_ready(self, session: aiohttp.ClientSession) -> bool:
        """The stack's own readiness signal (our router's /ready; Dynamo's frontend health and model list)."""
        return await self.stack.head_ready(session, self.router_url, self.plan)

    async def _control_ready(self, session: aiohttp.ClientSession) -> bool:
        """The control API answers (a run called ready can be operated: top, drain); true when none is planned."""
        if self.plan.control_port is None:
            return True
        try:
            async with session.get(f"http://{self.addr}:{self.plan.control_port}/health") as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _workers(self) -> dict[str, registry.WorkerRecord] | None:
        try:
            return await registry.load_workers(self.redis, self.run_id)
        except Exception:   # noqa: BLE001 - Redis blip: try again next tick
            return None

    async def run(self) -> str:
        planned = {w.id: w for w in self.plan.workers}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.plan.startup_timeout
        t0 = time.time()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            while True:   # startup
                recs = await self._workers()
                if recs is not None:
                    dead = sorted(w for w in planned if w in recs and recs[w].state == "dead")
                    if dead:
                        return f"worker(s) {', '.join(dead)} died during startup; see their logs in logs/"
                    ready = all(w in recs and recs[w].state == "ready" for w in planned)
                    if ready and await self._router_ready(session) and await self._control_ready(session):
                        break
                if loop.time() > deadline:
                    waiting = sorted(w for w in planned if recs is None or w not in recs or recs[w].state != "ready")
                    return (f"not ready after timeouts.startup={self.plan.startup_timeout}s; still waiting for: "
                            f"{', '.join(waiting) or 'router /ready or the control API'}")
                await asyncio.sleep(self.interval)
        self._publish_endpoint(time.time() - t0)
        await registry.set_status(self.redis, self.run_id, phase="ready", ready_at=f"{time.time():.3f}",
                                  endpoint=self.router_url)
        if self.on_ready is not None:
            await self.on_ready()
        return await self._watch_critical(planned)

    def _publish_endpoint(self, startup_s: float) -> None:
        info = {"url": self.router_url, "host": self.addr, "port": self.plan.router_port,
                "run_id": self.run_id, "ready_at": time.time(), "startup_seconds": round(startup_s, 2)}
        handover.promote(self.run_dir, info)   # a successor generation: the run's endpoint first
        atomic_write(self.run_dir / RunPaths.ENDPOINT, json.dumps(info, indent=1) + "\n")
        log.info("ready: %s (startup %.1fs)", self.router_url, startup_s)

    async def _watch_critical(self, planned) -> str:
        critical = {}
        for p in self.plan.processes:
            if p.kind == "engine" and p.critical and p.worker_id:
                critical.setdefault(p.group, set()).add(p.worker_id)
        while True:
            await asyncio.sleep(1.0)
            if not critical:
                continue
            recs = await self._workers()
            if recs is None:
                continue
            for group, ids in critical.items():
                if all(w in recs and recs[w].state == "dead" for w in ids):
                    return f"critical group {group!r} lost every worker ({', '.join(sorted(ids))}); ending the job"
