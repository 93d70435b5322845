"""One event loop per process, uvloop when it is installed: the single way every hpcserve process runs."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("hpcserve")


def run(coro):
    try:
        import uvloop
    except ImportError:   # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    if hasattr(uvloop, "run"):
        return uvloop.run(coro)
    uvloop.install()      # uvloop < 0.18
    return asyncio.run(coro)


async def cancel_and_wait(tasks, tries: int = 40) -> None:
    """Cancel until done: a cancellation that lands inside a Redis call can be turned into an ordinary error
    by the client and swallowed by a loop's ``except Exception``; the next cancel lands in its sleep."""
    for _ in range(tries):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            return
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.5)
    log.warning("tasks still running after cancellation: %s", [t.get_name() for t in tasks if not t.done()])
