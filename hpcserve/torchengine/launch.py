"""Start and stop torch engine processes for tests and benchmarks (one PID each, free ports of 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

from hpcserve.engine_shell.launch import EngineProcess, free_port


class TorchProcess(EngineProcess):
    # "listen": the torch engine answers /health as soon as its model is loaded and it listens
    MODULE, DEFAULT_MODEL, NAME, LOG_PREFIX = "hpcserve.torchengine", "random", "torch engine", "torch"
    DEFAULT_WAIT, DEFAULT_TIMEOUT = "listen", 60.0


def start_pd_pair(model_flags: list[str], log_dir: Path | None = None) -> tuple[TorchProcess, TorchProcess, int]:
    """A prefill and a decode server on free ports; returns (prefill, decode, bootstrap port)."""
    boot = free_port()
    prefill = TorchProcess.start(["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot),
                                  *model_flags], log_dir=log_dir)
    try:
        decode = TorchProcess.start(["--disaggregation-mode", "decode", *model_flags], log_dir=log_dir)
    except BaseException:
        prefill.stop()
        raise
    return prefill, decode, boot
