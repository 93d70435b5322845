"""The Dynamo stack: NVIDIA Dynamo's frontend (OpenAI HTTP, its KV or round-robin router) on the head node in
front of Dynamo workers (`dynamo.sglang` for engine.kind sglang, `dynamo.mocker` for the mock engine).

No etcd or NATS: discovery is Dynamo's file backend on the run directory (RUN/dynamo/, on the shared
filesystem), requests travel over TCP and KV events over ZeroMQ. Dynamo reads all of this from DYN_*
variables, so the wiring lives here and the engine flags stay in hpcserve/engines/dynamo.py. Each worker's
system server (its /health, ready once its generate endpoint is) listens on the worker's planned HTTP port,
so the node agents probe, register, restart and drain Dynamo workers like any other.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from hpcserve.errors import PlanError
from hpcserve.rundir import RunPaths
from hpcserve.stacks.base import register

# the engine registry entry that runs the workers, per engine.kind
WORKER_ENGINES = {"mock": "dynamo-mocker", "sglang": "dynamo-sglang"}
# recipe router policies -> the frontend's --router-mode (cache_aware: Dynamo's KV-cache-aware router)
ROUTER_MODES = {"round_robin": "round-robin", "random": "random", "power_of_two": "power-of-two",
                "least_load": "least-loaded", "cache_aware": "kv"}
# the Dynamo component a worker of each role registers its generate endpoint under
COMPONENT_OF_ROLE = {"both": "backend", "decode": "backend", "prefill": "prefill"}


def runtime_env() -> dict[str, str]:
    """What the frontend and every worker share: file discovery on the run dir, TCP requests, ZMQ events. One
    store per start of the job: a SIGKILLed worker's entries stay listed until their lease runs out (about
    10 s), which a requeued job in the same run dir must not see."""
    return {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": "{run_dir}/" + RunPaths.DYNAMO + "/{epoch}",
            "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
            "DYN_SDK_DISABLE_ANSI_LOGGING": "1"}   # plain lines in logs/ for `hpcserve logs`


class DynamoStack:
    name = "dynamo"
    steers_router = False
    api = "completions"        # the frontend serves OpenAI routes only (no /generate)

    def engine_kind(self, kind: str) -> str:
        if kind not in WORKER_ENGINES:
            raise PlanError(f"engine.kind: {kind} has no Dynamo worker; use {' or '.join(WORKER_ENGINES)} "
                            f"with stack: dynamo")
        return WORKER_ENGINES[kind]

    def head_argv(self, recipe, mode, workers, python, routers) -> list[str]:
        r = recipe.router
        policy = r.prefill_policy if mode == "pd" else r.policy
        if policy not in ROUTER_MODES:
            raise PlanError(f"router.{'prefill_policy' if mode == 'pd' else 'policy'}: {policy} has no Dynamo "
                            f"router mode; use one of {', '.join(ROUTER_MODES)} with stack: dynamo")
        if r.api_key_env:   # silently serving without the key the recipe asks for would be worse than refusing
            raise PlanError("router.api_key_env: Dynamo's frontend checks no API key; remove it (and guard the "
                            "endpoint otherwise) or use stack: sglang")
        host = "0.0.0.0" if recipe.serve.bind == "all" else "{addr}"
        return [python, "-m", "dynamo.frontend", "--http-host", host, "--http-port", str(r.port),
                "--router-mode", ROUTER_MODES[policy], *r.args]

    def head_env(self, recipe) -> dict[str, str]:
        return runtime_env()

    def worker_env(self, recipe, worker, launch) -> dict[str, str]:
        env = runtime_env()
        if launch.node_rank > 0:   # other ranks of a multi-node replica serve no endpoint of their own
            return env
        env.update({
            "DYN_SYSTEM_ENABLED": "true", "DYN_SYSTEM_HOST": launch.host, "DYN_SYSTEM_PORT": str(worker.port),
            # /health turns ready when the generate endpoint serves, not when the process merely runs
            "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS": '["generate"]',
            # the request-plane listener: the free slot after the HTTP port of the worker's port block
            "DYN_TCP_RPC_HOST": "{addr}", "DYN_TCP_RPC_PORT": str(worker.port + 1)})
        return env

    async def head_ready(self, session, url: str, plan) -> bool:
        """The frontend's /health names every planned worker's generate instance, per component, and its
        /v1/models lists the model (it does once a worker's model card is loaded)."""
        want: dict[str, int] = {}
        for w in plan.workers:
            want[COMPONENT_OF_ROLE[w.role]] = want.get(COMPONENT_OF_ROLE[w.role], 0) + 1
        try:
            async with session.get(url + "/health") as r:
                if r.status != 200:
                    return False
                health = json.loads(await r.read())
            async with session.get(url + "/v1/models") as r:
                if r.status != 200 or not json.loads(await r.read()).get("data"):
                    return False
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return False
        return all(n <= count_instances(health, comp) for comp, n in want.items())


def count_instances(health: dict, component: str) -> int:
    """Distinct worker instances serving `generate` under ``component`` in a frontend /health answer."""
    return len({i.get("instance_id") for i in health.get("instances") or []
                if i.get("endpoint") == "generate" and i.get("component") == component})


register(DynamoStack())
