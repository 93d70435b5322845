"""The control API from anywhere (the login node included): the head's address comes from the run dir
(endpoint.json, written when the run became ready), the port from plan.json, the bearer key from the
environment variable the recipe names (router.api_key_env). aiohttp, a timeout on every call."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp

from hpcserve.errors import HpcserveError
from hpcserve.plan.model import Plan
from hpcserve.rundir import RunPaths


class HeadUnreachable(HpcserveError):
    """The control API (or the router) of a run did not answer."""

    exit_code = 1


class ControlRefused(HpcserveError):
    """The control API answered with a 4xx/5xx; ``str()`` is its one-line reason."""

    exit_code = 2

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status


class ControlClient:
    def __init__(self, control_url: str, router_url: str | None, api_key: str | None, timeout: float = 5.0) -> None:
        self.url = control_url.rstrip("/")
        self.router_url = router_url.rstrip("/") if router_url else None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=min(2.0, timeout))
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_run(cls, run_dir: str | Path, timeout: float = 5.0) -> "ControlClient":
        paths = RunPaths(run_dir)
        try:
            plan = Plan.from_json((paths / RunPaths.PLAN).read_bytes())
        except (OSError, ValueError):
            raise HpcserveError(f"{run_dir}: no readable plan.json; give a run directory or a job id") from None
        if plan.control_port is None:
            raise HpcserveError(f"{run_dir}: this run has no control API (it comes with router.kind hpcserve)")
        endpoint = paths.read(RunPaths.ENDPOINT)
        if not endpoint or not endpoint.get("host"):
            raise HeadUnreachable(f"{run_dir}: no endpoint.json yet (the run is not ready, or not started); "
                                  "see `hpcserve status`")
        key = None
        if plan.api_key_env:
            key = os.environ.get(plan.api_key_env)
            if not key:
                raise HpcserveError(f"the run needs the API key: export {plan.api_key_env} (the recipe's "
                                    "router.api_key_env)")
        host = endpoint["host"]
        return cls(f"http://{host}:{plan.control_port}", endpoint.get("url"), key, timeout)

    async def __aenter__(self) -> "ControlClient":
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        t = aiohttp.ClientTimeout(total=timeout, connect=2.0) if timeout else None
        try:
            async with self._session.request(method, self.url + path, json=body, headers=self.headers,
                                             timeout=t) as r:
                doc = await r.json(content_type=None)
                if r.status >= 400:
                    raise ControlRefused(r.status, (doc or {}).get("detail", r.reason) if isinstance(doc, dict)
                                         else str(r.reason))
                return doc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
            raise HeadUnreachable(f"head unreachable: the control API at {self.url} did not answer "
                                  f"({type(err).__name__}: {err or 'timeout'})") from None

    async def router_metrics(self) -> str:
        if not self.router_url:
            raise HeadUnreachable("no router endpoint in the run dir")
        try:
            async with self._session.get(self.router_url + "/metrics") as r:
                return await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise HeadUnreachable(f"head unreachable: the router at {self.router_url} did not answer "
                                  f"({type(err).__name__})") from None


def get_all(run_dir: str | Path, paths: list[str], timeout: float = 5.0) -> list[Any]:
    """Several GETs at once, synchronously: one connection attempt bounds the wait when the head is away."""
    async def go() -> list[Any]:
        async with ControlClient.for_run(run_dir, timeout) as c:
            return list(await asyncio.gather(*(c.call("GET", p) for p in paths)))
    return asyncio.run(go())


def call(run_dir: str | Path, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
    """One call, synchronously (for CLI verbs and `status`)."""
    async def go() -> Any:
        async with ControlClient.for_run(run_dir, timeout) as c:
            return await c.call(method, path, body)
    return asyncio.run(go())
