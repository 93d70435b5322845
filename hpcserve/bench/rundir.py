"""Benchmark a run directory instead of a URL: the endpoint, GPU count, name and sweep point come from the
files the deployment wrote (endpoint.json, plan.json), and worker restarts are read from the run's Redis
(redis.json) so that a restart during a level makes it invalid."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from hpcserve.bench.validity import RestartCounter, registry_restart_counter
from hpcserve.bench.workload import BenchError
from hpcserve.rundir import RunPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    url: str
    gpus: int                   # GPUs of all worker replicas in the plan (>= 1)
    name: str
    point: dict = field(default_factory=dict)
    redis_url: str | None = None
    run_id: str = ""            # the registry's key prefix: the agents use the run dir's name
    api: str = "auto"           # what the run's stack serves (a Dynamo frontend has no /generate)


def read_run(path: Path | str) -> RunInfo:
    """What a ready run dir says about itself; a one-line BenchError when it is not a ready run."""
    run_dir = Path(path).resolve()
    if not (run_dir / RunPaths.ENDPOINT).is_file():
        if (run_dir / RunPaths.SWEEP).is_file():
            raise BenchError(f"{run_dir} is a sweep; pass the run dir of one point (a sub-directory)")
        if (run_dir / RunPaths.PLAN).is_file():
            raise BenchError(f"{run_dir} has no {RunPaths.ENDPOINT}: the deployment is not ready (yet); "
                             f"check `hpcserve status {run_dir}`")
        raise BenchError(f"{run_dir} is not a run directory (no {RunPaths.PLAN}); pass a URL or a run dir")
    url = _read_json(run_dir / RunPaths.ENDPOINT).get("url")
    if not isinstance(url, str) or "://" not in url:
        raise BenchError(f"{run_dir / RunPaths.ENDPOINT} has no 'url'; the run dir is damaged, pass the URL instead")
    name, point, gpus, api = run_dir.name, {}, 1, "auto"
    if (run_dir / RunPaths.PLAN).is_file():
        from hpcserve.plan.model import Plan
        try:
            plan = Plan.from_json((run_dir / RunPaths.PLAN).read_bytes())
        except ValueError as e:
            raise BenchError(f"{run_dir / RunPaths.PLAN} does not load ({str(e).splitlines()[0]}); "
                             "pass --gpus N and the URL instead") from None
        name, point = plan.name, dict(plan.point)
        from hpcserve.stacks.base import get_stack
        api = get_stack(plan.stack).api
        gpus = max(1, sum(w.gpus for w in plan.workers))   # mock deployments plan 0 GPUs
    redis_url = None
    if (run_dir / RunPaths.REDIS).is_file():
        redis_url = _read_json(run_dir / RunPaths.REDIS).get("url")
    return RunInfo(run_dir=run_dir, url=url, gpus=gpus, name=name, point=point, redis_url=redis_url,
                   run_id=run_dir.name, api=api)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read {path} ({e}); is the run dir readable and complete?") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path} is not a JSON object; the run dir is damaged")
    return data


@asynccontextmanager
async def run_restart_counter(info: RunInfo) -> AsyncIterator[RestartCounter | None]:
    """The run's registry restart counter, or None (with a warning) when the registry is unreachable or
    empty, so the benchmark still runs without restart detection."""
    if not info.redis_url:
        log.warning("no %s in %s: worker restarts will not be detected", RunPaths.REDIS, info.run_dir)
        yield None
        return
    import redis.asyncio as aioredis
    client = aioredis.from_url(info.redis_url, socket_timeout=5, socket_connect_timeout=3)
    try:
        counter = registry_restart_counter(client, info.run_id)
        try:
            from hpcserve.registry import workers_key
            known = await client.hlen(workers_key(info.run_id))
            await counter()
        except Exception as e:  # noqa: BLE001 - any Redis failure: bench without restart detection
            log.warning("run Redis at %s unreachable (%s): worker restarts will not be detected",
                        _redact(info.redis_url), e)
            yield None
            return
        if not known:
            log.warning("no workers registered under run id %s: worker restarts will not be detected",
                        info.run_id)
            yield None
            return
        yield counter
    finally:
        await client.aclose()


def _redact(url: str) -> str:
    """The Redis URL without its password (it must never reach a log)."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
