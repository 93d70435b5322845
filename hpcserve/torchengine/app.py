"""Process lifecycle of the torch engine: parse flags, build or load the model, listen, run until SIGTERM."""

from __future__ import annotations

from hpcserve import aio

import asyncio
import sys
from dataclasses import replace

from hpcserve.http import HttpServer
from hpcserve.http.listen import StartupError, listen, stop_on_signals
from hpcserve.torchengine.config import EngineConfig, UsageError, parse_args


def _say(msg: str) -> None:
    print(f"torch engine: {msg}", file=sys.stderr, flush=True)


def build_model(cfg: EngineConfig):
    from hpcserve.torchengine import checkpoint
    from hpcserve.torchengine.model import TinyLlama
    if cfg.model_path == "random":
        return TinyLlama.random(cfg.tiny, cfg.seed)
    try:
        return checkpoint.load(cfg.model_path)
    except checkpoint.CheckpointError as err:
        raise StartupError(str(err)) from None


async def serve(cfg: EngineConfig) -> int:
    import torch
    from hpcserve.torchengine.bootstrap import BinaryBootstrapServer
    from hpcserve.torchengine.server import TorchServer
    torch.set_num_threads(max(1, cfg.threads))
    model = build_model(cfg)
    if cfg.context_length > model.cfg.max_seq:
        cfg = replace(cfg, context_length=model.cfg.max_seq)
    stop = stop_on_signals()
    engine = TorchServer(cfg, model)
    engine.scheduler.start()
    servers: list[HttpServer] = []
    try:
        http = HttpServer(engine.handle, max_body_bytes=64 * 1024 * 1024)
        await listen(http, cfg.host, cfg.port, "HTTP", "--port")
        servers.append(http)
        if cfg.mode == "prefill":
            boot = HttpServer(BinaryBootstrapServer(engine.store, cfg.bootstrap_timeout).handle)
            await listen(boot, cfg.host, cfg.bootstrap_port, "PD bootstrap", "--disaggregation-bootstrap-port")
            servers.append(boot)
        m = model.cfg
        _say(f"{cfg.mode} server for {cfg.served_model_name} on http://{cfg.host}:{cfg.port}"
             + (f", bootstrap port {cfg.bootstrap_port}" if cfg.mode == "prefill" else "")
             + f", {m.n_layers} layers, dim {m.dim}, {sum(p.numel() for p in model.parameters())} parameters")
        print("The server is fired up and ready to roll!", flush=True)
        await stop.wait()
        return 0
    finally:
        for s in servers:
            await asyncio.wait_for(s.stop(), 5.0)
        engine.close()
        await engine.scheduler.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpcserve.torchengine``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        from hpcserve.torchengine.config import build_parser
        build_parser().print_help()
        return 0
    try:
        cfg = parse_args(argv)
        return aio.run(serve(cfg))
    except (UsageError, StartupError) as err:
        _say(f"error: {err}")
        return 2
    except ImportError as err:
        _say(f"error: {err} (the torch engine needs torch: pip install torch)")
        return 2
    except KeyboardInterrupt:
        return 0
