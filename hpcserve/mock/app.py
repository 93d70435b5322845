"""Process lifecycle of the mock engine: parse flags, bind ports, run until SIGTERM/SIGINT (exit 0)."""

from __future__ import annotations

from hpcserve import aio

import asyncio
import sys

from hpcserve.engine_shell.bootstrap import BootstrapServer
from hpcserve.http import HttpServer, Request
from hpcserve.http.listen import StartupError, listen, stop_on_signals
from hpcserve.mock.cli import MockConfig, UsageError, parse_args, usage
from hpcserve.mock.multinode import Ranks, run_follower
from hpcserve.mock.server import MockServer


def _say(msg: str) -> None:
    print(f"mock engine: {msg}", file=sys.stderr, flush=True)


async def _announce_ready(mock: MockServer, stop: asyncio.Event) -> None:
    """Print SGLang's ready line once /health would answer 200 (logs are easier to read that way)."""
    while not stop.is_set() and mock.ready() is not None:
        await asyncio.sleep(0.05)
    if not stop.is_set():
        print("The server is fired up and ready to roll!", flush=True)


async def serve(cfg: MockConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = stop_on_signals()
    if cfg.nnodes > 1 and cfg.node_rank > 0:
        return await run_follower(cfg, stop)
    ranks = Ranks(cfg)
    mock = MockServer(cfg, ranks)
    servers: list[HttpServer] = []
    try:
        # newer HTTP layers take handlers that may answer synchronously (no task per request)
        handler = mock.handle if hasattr(Request, "header") else mock.handle_async
        http = HttpServer(handler, max_body_bytes=256 * 1024 * 1024)
        await listen(http, cfg.host, cfg.port, "HTTP", "--port")
        servers.append(http)
        if cfg.disaggregation_mode == "prefill":
            boot = HttpServer(BootstrapServer(mock.engine.store, cfg.bootstrap_timeout).handle)
            await listen(boot, cfg.host, cfg.disaggregation_bootstrap_port, "PD bootstrap",
                          "--disaggregation-bootstrap-port")
            servers.append(boot)
        if cfg.nnodes > 1:
            await ranks.start_leader()
        mock.engine.start()
        _say(f"{cfg.disaggregation_mode} server for {cfg.served_model_name} on http://{cfg.host}:{cfg.port}"
             + (f", bootstrap port {cfg.disaggregation_bootstrap_port}" if cfg.disaggregation_mode == "prefill"
                else "") + f", time scale {cfg.time_scale:g}")
        announce = loop.create_task(_announce_ready(mock, stop))
        await stop.wait()
        announce.cancel()
        _say("stop signal: draining")   # tests check that a runtime's stop signal arrives as SIGTERM
        return 0
    finally:
        await asyncio.wait_for(_shutdown(servers, ranks, mock), 5.0)


async def _shutdown(servers: list[HttpServer], ranks: Ranks, mock: MockServer) -> None:
    await ranks.stop()
    for s in servers:
        await s.stop()
    await mock.engine.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hpcserve.mock` and `hpcserve mock-engine`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    try:
        cfg = parse_args(argv)
        return aio.run(serve(cfg))
    except (UsageError, StartupError) as err:
        _say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        return 0
