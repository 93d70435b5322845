"""Start-up pieces every engine stand-in (mock, torch) shares: listening with a one-line error naming the
flag to change, and a stop event set by SIGTERM/SIGINT (engines exit 0 on either)."""

from __future__ import annotations

import asyncio
import signal

from hpcserve.http.server import HttpServer


class StartupError(Exception):
    """A start-up problem the user fixes with a flag (port taken, bad file): one line, exit code 2."""


async def listen(server: HttpServer, host: str, port: int, what: str, flag: str) -> None:
    try:
        await server.start(host, port)
    except OSError as err:
        raise StartupError(f"cannot listen on {host}:{port} ({what}): {err.strerror or err} "
                           f"(choose another {flag})") from None


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
