"""What the control API knows and does: the registry (pooled redis.asyncio client, timeouts on every call),
the router's /metrics and /workers, the engines' KV gauges, and operator actions with a bounded wait for
their effect."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from hpcserve import registry
from hpcserve.control.models import ActionResult, GroupView, RunView, WorkerView
from hpcserve.plan.model import Plan
from hpcserve.rundir import RunPaths, read_json

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=3, connect=1)
ENGINE_TIMEOUT = aiohttp.ClientTimeout(total=1, connect=0.5)
REDIS_POOL = 16


class ControlError(Exception):
    """Answered as ``status`` with a one-line ``detail``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_router_metrics(text: str) -> dict[str, dict]:
    """The router's per-worker gauges and counters: worker -> {inflight, healthy, rotation, requests}."""
    fields = {"hpcserve_router_worker_inflight": "inflight", "hpcserve_router_worker_healthy": "healthy",
              "hpcserve_router_worker_in_rotation": "rotation", "hpcserve_router_worker_requests_total": "requests"}
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = fields.get(s.name)
            if key is not None:
                out.setdefault(s.labels["worker"], {})[key] = int(s.value)
    return out


def engine_gauges(text: str) -> tuple[float | None, float | None]:
    """SGLang's sglang:token_usage and sglang:cache_hit_rate, when the engine exports them."""
    usage = ratio = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "sglang:token_usage":
                usage = float(s.value)
            elif s.name == "sglang:cache_hit_rate":
                ratio = float(s.value)
    return usage, ratio


async def until(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``check`` until it is true or ``timeout`` seconds passed (failed checks count as false)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, aioredis.RedisError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


class Control:
    def __init__(self, run_dir: Path, run_id: str, router_url: str, api_key: str | None, redis_url: str,
                 control_url: str) -> None:
        self.paths = RunPaths(run_dir)
        self.plan = Plan.from_json((self.paths / RunPaths.PLAN).read_bytes())
        self.run_id = run_id
        self.router_url = router_url.rstrip("/")
        self.control_url = control_url
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=REDIS_POOL, timeout=5, socket_timeout=5, socket_connect_timeout=3,
            health_check_interval=10)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.session: aiohttp.ClientSession | None = None
        self.actions: dict[tuple[str, str], int] = {}   # (action, ok) -> count, for /metrics
        self.groups = {}   # group -> (role, [worker ids]) from the plan
        for w in self.plan.workers:
            self.groups.setdefault(w.group, (w.role, []))[1].append(w.id)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.redis.aclose()

    # ---- reading
    async def records(self) -> dict[str, registry.WorkerRecord]:
        return await registry.load_workers(self.redis, self.run_id)

    async def record(self, wid: str) -> registry.WorkerRecord:
        recs = await self.records()
        if wid not in recs:
            known = ", ".join(sorted(recs)) or "none registered"
            raise ControlError(404, f"unknown worker {wid!r}; workers: {known}")
        return recs[wid]

    async def router_metrics(self) -> dict[str, dict] | None:
        try:
            async with self.session.get(self.router_url + "/metrics") as r:
                return parse_router_metrics(await r.text()) if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def router_workers(self) -> dict | None:
        try:
            async with self.session.get(self.router_url + "/workers", headers=self.auth) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None

    async def _engine(self, rec: registry.WorkerRecord) -> tuple[float | None, float | None]:
        try:
            async with self.session.get(rec.url + "/metrics", timeout=ENGINE_TIMEOUT) as r:
                return engine_gauges(await r.text()) if r.status == 200 else (None, None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None, None

    async def workers(self, only: str | None = None) -> list[WorkerView]:
        recs = await self.records()
        if only is not None:
            if only not in recs:
                raise ControlError(404, f"unknown worker {only!r}; workers: {', '.join(sorted(recs)) or 'none'}")
            recs = {only: recs[only]}
        metrics, view, kv = await asyncio.gather(
            self.router_metrics(), self.router_workers(),
            asyncio.gather(*(self._engine(r) for r in recs.values() if r.state != "dead")))
        kv_of = dict(zip([w for w, r in recs.items() if r.state != "dead"], kv))
        routed = {w["id"]: w for w in (view or {}).get("workers", [])}
        out = []
        for wid, rec in sorted(recs.items()):
            m = (metrics or {}).get(wid, {})
            r = routed.get(wid, {})
            usage, ratio = kv_of.get(wid, (None, None))
            out.append(WorkerView(**rec.model_dump(), inflight=m.get("inflight"), requests=m.get("requests"),
                                  healthy=bool(m["healthy"]) if "healthy" in m else None,
                                  circuit=r.get("circuit"), last_error=r.get("last_error") or "",
                                  kv_usage=usage, cached_token_ratio=ratio))
        return out

    async def group_views(self) -> list[GroupView]:
        view, chosen = await asyncio.gather(self.router_workers(), registry.load_policies(self.redis, self.run_id))
        policies = (view or {}).get("policies", {})
        return [GroupView(group=g, role=role, workers=ids, policy=(policies.get(role) or {}).get("name"),
                          chosen_policy=chosen.get(role)) for g, (role, ids) in self.groups.items()]

    async def run(self) -> RunView:
        status = {k.decode(): v.decode() for k, v in (await self.redis.hgetall(
            registry.status_key(self.run_id))).items()}
        endpoint = read_json(self.paths / RunPaths.ENDPOINT) or {}
        p = self.plan

        def num(key: str) -> float | None:
            try:
                return float(status[key])
            except (KeyError, ValueError):
                return None
        return RunView(run_id=self.run_id, name=p.name, mode=p.mode, engine=p.engine, backend=p.backend,
                       nodes=p.num_nodes, point=p.point, phase=status.get("phase", "unknown"),
                       endpoint=endpoint.get("url") or status.get("endpoint"), control=self.control_url,
                       started_at=num("started_at"), ready_at=num("ready_at"), groups=await self.group_views(),
                       progress={k: v for k, v in status.items() if k.startswith("batch_")})

    async def events(self, count: int) -> list[registry.Event]:
        return await registry.recent_events(self.redis, self.run_id, count)

    async def follow(self, count: int) -> AsyncIterator[bytes]:
        """Server-sent events: the last ``count`` events, then each new one as it is added; a comment line
        every second keeps proxies open and lets a gone client be noticed."""
        last = "0-0"
        for ev in await self.events(count):
            last = ev.id
            yield _sse(ev)
        if last == "0-0":
            last = "$"
        key = registry.events_key(self.run_id)
        while True:
            try:
                got = await self.redis.xread({key: last}, block=1000, count=100)
            except (aioredis.RedisError, OSError):
                await asyncio.sleep(1.0)   # Redis away: the stream resumes when it is back
                got = []
            if not got:
                yield b": keep-alive\n\n"
            for _, entries in got:
                for entry_id, body in entries:
                    ev = registry.Event.from_entry(entry_id, body)
                    last = ev.id
                    yield _sse(ev)

    async def prometheus(self) -> bytes:
        """The control plane's metrics: the agents' registry (workers by role and state, restarts) and the
        operator actions taken here. Listed in docs/metrics.md."""
        try:
            recs = await self.records()
            up = 1
        except (aioredis.RedisError, OSError):
            recs, up = {}, 0
        states = GaugeMetricFamily("hpcserve_workers", "Workers in the registry by role and state (heartbeat "
                                   "expired: dead).", labels=["role", "state"])
        counts: dict[tuple[str, str], int] = {}
        for rec in recs.values():
            counts[(rec.role, rec.state)] = counts.get((rec.role, rec.state), 0) + 1
        for (role, state), n in sorted(counts.items()):
            states.add_metric([role, state], n)
        restarts = CounterMetricFamily("hpcserve_worker_restarts", "Engine restarts of each worker, as its node "
                                       "agent counts them (crashes and operator restarts).",
                                       labels=["worker", "role", "group"])
        for wid, rec in sorted(recs.items()):
            restarts.add_metric([wid, rec.role, rec.group], rec.restarts)
        actions = CounterMetricFamily("hpcserve_control_actions", "Operator actions through the control API, "
                                      "by action and outcome.", labels=["action", "ok"])
        for (action, ok), n in sorted(self.actions.items()):
            actions.add_metric([action, ok], n)
        registry_up = GaugeMetricFamily("hpcserve_control_registry_up", "1 if the run's Redis answered this scrape.")
        registry_up.add_metric([], up)
        families = [states, restarts, actions, registry_up]
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Families(families))
        return generate_latest(reg)

    # ---- actions
    async def _send(self, action: str, wid: str) -> None:
        listeners = await registry.send_command(self.redis, self.run_id, registry.Command(action=action, worker=wid))
        if listeners == 0:
            raise ControlError(503, "no node agent is listening for commands; is the job running?")

    async def _record_event(self, result: ActionResult) -> ActionResult:
        key = (result.action, "true" if result.ok else "false")
        self.actions[key] = self.actions.get(key, 0) + 1
        await registry.emit_event(self.redis, self.run_id, "action", action=result.action, target=result.target,
                                  ok=result.ok, message=result.message)
        return result

    async def _router_has(self, wid: str, **want: int) -> bool:
        m = await self.router_metrics()
        return m is not None and all(m.get(wid, {}).get(k) == v for k, v in want.items())

    async def _not_last(self, rec: registry.WorkerRecord, force: bool) -> None:
        """Refuse to take the last serving worker of a role out of rotation (new requests would get 503)."""
        if force:
            return
        others = [r for r in (await self.records()).values()
                  if r.id != rec.id and r.role == rec.role and r.state == "ready" and r.rotation]
        if not others:
            raise ControlError(409, f"{rec.id} is the last {rec.role} worker in rotation: new requests would be "
                                    f"refused (503); pass force=true to do it anyway")

    async def drain(self, wid: str, timeout: float, force: bool = False) -> ActionResult:
        rec = await self.record(wid)
        if rec.state != "ready":
            raise ControlError(409, f"worker {wid} is {rec.state}; only a ready worker can be drained")
        await self._not_last(rec, force)
        await self._send("drain", wid)
        marked = await until(lambda: self._state_is(wid, "draining"), 10.0)
        idle = marked and await until(lambda: self._router_has(wid, rotation=0, inflight=0), timeout)
        views = await self.workers(wid)
        if not marked:
            msg = f"the agent of {wid} did not mark it draining within 10 s"
        elif not idle:
            msg = f"{wid} is out of rotation; {views[0].inflight} request(s) still in flight after {timeout:g} s"
        else:
            msg = f"{wid} drained: out of rotation, no request in flight"
        return await self._record_event(ActionResult(action="drain", target=wid, ok=marked and idle, message=msg,
                                                     worker=views[0]))

    async def _state_is(self, wid: str, state: str) -> bool:
        rec = (await self.records()).get(wid)
        return rec is not None and rec.state == state

    async def restart(self, wid: str, timeout: float) -> ActionResult:
        rec = await self.record(wid)
        if rec.state == "dead":
            raise ControlError(409, f"worker {wid} is dead (its process is gone); the job must be restarted")
        await self._send("restart", wid)

        async def back() -> bool:
            now = (await self.records()).get(wid)
            return now is not None and now.restarts > rec.restarts and now.state == "ready" and \
                await self._router_has(wid, rotation=1, healthy=1)
        ok = await until(back, timeout)
        views = await self.workers(wid)
        msg = (f"{wid} restarted (restart {views[0].restarts}) and back in rotation" if ok
               else f"{wid} not ready again within {timeout:g} s (state {views[0].state})")
        return await self._record_event(ActionResult(action="restart", target=wid, ok=ok, message=msg,
                                                     worker=views[0]))

    async def rotation(self, wid: str, rotation: bool, timeout: float = 10.0, force: bool = False) -> ActionResult:
        rec = await self.record(wid)
        if rec.state not in ("ready", "draining"):
            raise ControlError(409, f"worker {wid} is {rec.state}; only a ready or draining worker changes rotation")
        if not rotation and rec.rotation and rec.state == "ready":
            await self._not_last(rec, force)
        action = "rotate_in" if rotation else "rotate_out"
        await self._send(action, wid)

        async def applied() -> bool:
            now = (await self.records()).get(wid)
            return now is not None and now.rotation == rotation and await self._router_has(wid, rotation=int(rotation))
        ok = await until(applied, timeout)
        views = await self.workers(wid)
        msg = f"{wid} {'back in' if rotation else 'out of'} rotation" if ok else \
            f"the router did not show {wid} {'in' if rotation else 'out of'} rotation within {timeout:g} s"
        return await self._record_event(ActionResult(action=action, target=wid, ok=ok, message=msg, worker=views[0]))

    async def set_policy(self, group: str, policy: str, timeout: float = 10.0) -> ActionResult:
        if group not in self.groups:
            raise ControlError(404, f"unknown group {group!r}; groups: {', '.join(self.groups)}")
        role = self.groups[group][0]
        await registry.set_policy(self.redis, self.run_id, role, policy)

        async def applied() -> bool:
            view = await self.router_workers()
            return view is not None and (view.get("policies", {}).get(role) or {}).get("name") == policy
        ok = await until(applied, timeout)
        gv = next(g for g in await self.group_views() if g.group == group)
        msg = f"{group} routes with {policy} now" if ok else \
            f"{policy} recorded for {group}; the router did not confirm within {timeout:g} s"
        return await self._record_event(ActionResult(action="policy", target=group, ok=ok, message=msg, group=gv))


class _Families:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def _sse(ev: registry.Event) -> bytes:
    return f"id: {ev.id}\nevent: {ev.kind}\ndata: {json.dumps(ev.model_dump())}\n\n".encode()
