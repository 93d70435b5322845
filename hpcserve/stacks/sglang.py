"""The default stack: hpcserve's router or sglang-router (``router.kind``) in front of SGLang HTTP servers
(or the stand-in engines), workers registered in Redis by the node agents."""

from __future__ import annotations

import asyncio

import aiohttp

from hpcserve.stacks.base import register


class SGLangStack:
    name = "sglang"
    steers_router = True
    api = "generate"

    def engine_kind(self, kind: str) -> str:
        return kind

    def head_argv(self, recipe, mode, workers, python, routers) -> list[str]:
        return routers[recipe.router.kind](recipe, mode, workers, python)

    def head_env(self, recipe) -> dict[str, str]:
        return {}

    def worker_env(self, recipe, worker, launch) -> dict[str, str]:
        return {}

    async def head_ready(self, session, url: str, plan) -> bool:
        try:
            async with session.get(url + "/ready") as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False


register(SGLangStack())
