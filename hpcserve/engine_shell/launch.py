"""Start and stop stand-in engine processes (for tests, benchmarks and demos that need a few local workers).

``EngineProcess`` subclasses name the engine module (the mock's ``MockProcess``, the torch engine's
``TorchProcess``). ``start([...flags...])`` runs ``python -m MODULE`` on a free port of 127.0.0.1 (unless
the flags name one), waits until it listens, and ``stop()`` ends exactly that PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status of a GET, or None when nothing answers."""
    try:
        with urlopen(url, timeout=timeout) as r:
            return r.status
    except HTTPError as err:
        return err.code
    except (URLError, OSError):
        return None


class EngineProcess:
    """One engine process on 127.0.0.1; a subclass names its module, default model, name and log prefix."""

    MODULE: str
    DEFAULT_MODEL: str
    NAME: str
    LOG_PREFIX: str
    DEFAULT_WAIT, DEFAULT_TIMEOUT = "listen", 30.0

    def __init__(self, proc: subprocess.Popen, port: int, argv: list[str], log: Path | None) -> None:
        self.proc = proc
        self.port = port
        self.argv = argv
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, flags: list[str], *, log_dir: Path | None = None, wait: str | None = "default",
              timeout: float | None = None, env: dict[str, str] | None = None) -> "EngineProcess":
        """``wait``: "listen" (HTTP answers, maybe 503), "ready" (/health 200) or None; "default": the
        class's DEFAULT_WAIT."""
        wait = cls.DEFAULT_WAIT if wait == "default" else wait
        timeout = cls.DEFAULT_TIMEOUT if timeout is None else timeout
        flags = list(flags)
        if "--model-path" not in flags:
            flags = ["--model-path", cls.DEFAULT_MODEL, *flags]
        if "--host" not in flags:
            flags += ["--host", "127.0.0.1"]
        if "--port" in flags:
            port = int(flags[flags.index("--port") + 1])
        else:
            port = free_port()
            flags += ["--port", str(port)]
        argv = [sys.executable, "-m", cls.MODULE, *flags]
        log = None
        out = subprocess.DEVNULL
        if log_dir is not None:
            log = Path(log_dir) / f"{cls.LOG_PREFIX}-{port}.log"
            out = log.open("ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        if log is not None:
            out.close()
        mp = cls(proc, port, argv, log)
        if wait is not None:
            mp.wait(wait, timeout)
        return mp

    def wait(self, what: str = "listen", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.NAME} exited with {self.proc.returncode}: {self.tail()}")
            status = http_status(self.url + "/health", timeout=1.0)
            if status == 200 or (status is not None and what == "listen"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.NAME} on port {self.port} not {what} within {timeout:g} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        if self.log is not None and self.log.exists():
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM this PID (then SIGKILL after ``timeout``); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode
