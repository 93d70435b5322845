"""One event loop per process, uvloop when it is installed: the single way every hpcserve process runs."""

from __future__ import annotations

import asyncio


def run(coro):
    try:
        import uvloop
    except ImportError:   # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    if hasattr(uvloop, "run"):
        return uvloop.run(coro)
    uvloop.install()      # uvloop < 0.18
    return asyncio.run(coro)
