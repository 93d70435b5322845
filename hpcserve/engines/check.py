"""Check a plan's engine command lines with SGLang's own parser (when sglang is importable here)."""

from __future__ import annotations

import re

from hpcserve.errors import HpcserveError

_PLACEHOLDER = re.compile(r"\{(addr|host:(\d+))\}")


def sglang_argv(argv: list[str]) -> list[str]:
    """The flags after `-m module`, placeholders filled with sample addresses, --mock-* options dropped."""
    args = argv[argv.index("-m") + 2:]
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith("--mock-"):
            skip = True
            continue
        out.append(_PLACEHOLDER.sub(lambda m: "127.0.0.1" if m.group(1) == "addr" else f"10.0.0.{m.group(2)}", a))
    return out


def check_plan_engine_args(plan) -> list[str]:
    """Problems SGLang's parser finds in the plan's engine processes (a hpcserve.plan.model.Plan; engines sit
    below plan in the layers, so the type is not imported)."""
    from hpcserve.engines import sglang_check
    from hpcserve.engines.base import get_engine
    own = getattr(get_engine(plan.engine), "check_argv", None)   # an engine with its own parser (Dynamo's)
    if own is not None:
        return [f"{p.name}: {e}" for p in plan.processes if p.kind == "engine" for e in own(sglang_argv(p.argv))]
    if not sglang_check.sglang_available():
        raise HpcserveError("--engine-check needs sglang importable here: pip install 'hpcserve[sglang]' "
                            "(or pip install --no-deps sglang==0.5.23 plus CPU torch)")
    problems = []
    for p in plan.processes:
        if p.kind == "engine":
            problems += [f"{p.name}: {e}" for e in sglang_check.check_argv(sglang_argv(p.argv))]
    return problems


def version_note(wanted: str | None, engine: str | None = None) -> str:
    """Which SGLang the check used, and a warning when the recipe pins another (flags differ between releases).
    An engine with its own parser (``engine``: the plan's engine name) says which parser it used instead."""
    from hpcserve.engines import sglang_check
    from hpcserve.engines.base import get_engine
    own = getattr(get_engine(engine), "check_note", None) if engine else None
    if own is not None:
        return own()
    found = sglang_check.sglang_version() or "unknown"
    if wanted is None:
        return f"engine check: sglang {found} (installed here; pin engine.version in the recipe to compare)"
    if wanted != found:
        return (f"warning: engine check used sglang {found} installed here but the recipe pins engine.version "
                f"{wanted}: flags may differ; install sglang=={wanted} here to check against it")
    return f"engine check: sglang {found} (matches engine.version)"
