"""Stack protocol and registry: which head-node process fronts the workers, which engine runs them, what
environment wires them together, and how the head node knows the deployment is ready.

The planner (``hpcserve.plan``) and the node agent ask the recipe's stack; nothing else looks at its name.
Engine flags stay in ``hpcserve.engines``: a stack only picks the engine registry entry.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from hpcserve.errors import PlanError

# A head-node command builder: (recipe, mode, workers, python) -> argv (plan/router_cmd.py ROUTERS entries).
RouterArgv = Callable[[Any, str, list, str], list[str]]


class Stack(Protocol):
    name: str
    steers_router: bool        # the head process is hpcserve's own router (its control API applies)
    api: str                   # what `hpcserve bench` sends to the endpoint: generate (SGLang's) | completions

    def engine_kind(self, kind: str) -> str:
        """The engine registry entry that runs the workers for the recipe's ``engine.kind``."""

    def head_argv(self, recipe, mode: str, workers: list, python: str, routers: dict[str, RouterArgv]) -> list[str]:
        """The head-node process that serves the OpenAI endpoint (``routers``: the router kinds of the plan)."""

    def head_env(self, recipe) -> dict[str, str]:
        """Extra environment of the head-node process (placeholders like {run_dir} allowed)."""

    def worker_env(self, recipe, worker, launch) -> dict[str, str]:
        """Extra environment of one worker's engine process."""

    async def head_ready(self, session, url: str, plan) -> bool:
        """True once the head process at ``url`` serves the planned workers (aiohttp ``session``)."""


STACKS: dict[str, Stack] = {}


def register(stack: Stack) -> Stack:
    STACKS[stack.name] = stack
    return stack


def get_stack(name: str) -> Stack:
    _load_builtin()
    if name not in STACKS:
        raise PlanError(f"stack: unknown stack {name!r}; choose one of: {', '.join(sorted(STACKS))}")
    return STACKS[name]


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from hpcserve.stacks import dynamo, sglang  # noqa: F401  (registers)
