"""Start and stop torch engine processes for tests and benchmarks (one PID each, free ports of 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hpcserve.mock.launch import MockProcess, free_port, http_status


class TorchProcess(MockProcess):
    @classmethod
    def start(cls, flags: list[str], *, log_dir: Path | None = None, wait: str | None = "ready",
              timeout: float = 60.0, env: dict[str, str] | None = None) -> "TorchProcess":
        flags = list(flags)
        if "--model-path" not in flags:
            flags = ["--model-path", "random", *flags]
        if "--host" not in flags:
            flags += ["--host", "127.0.0.1"]
        if "--port" in flags:
            port = int(flags[flags.index("--port") + 1])
        else:
            port = free_port()
            flags += ["--port", str(port)]
        argv = [sys.executable, "-m", "hpcserve.torchengine", *flags]
        log = Path(log_dir) / f"torch-{port}.log" if log_dir is not None else None
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        if log is not None:
            out.close()
        tp = cls(proc, port, argv, log)
        if wait is not None:
            tp.wait(wait, timeout)
        return tp

    def wait(self, what: str = "ready", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"torch engine exited with {self.proc.returncode}: {self.tail()}")
            if http_status(self.url + "/health", timeout=1.0) is not None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"torch engine on port {self.port} not up within {timeout:g} s: {self.tail()}")


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
