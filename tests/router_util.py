"""Helpers for the router tests (no tests here): a router subprocess on a free port, mock workers, waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

from hpcserve.engine_shell.launch import free_port
from hpcserve.mock.launch import MockProcess


def wait_until(check: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as err:
            last = err
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or check}: last {last!r}")


class RouterProc:
    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 wait_ready: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"router-{self.port}.log"
        argv = [sys.executable, "-m", "hpcserve.router", "--port", str(self.port), "--log-level", "info", *args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        wait_until(lambda: self._status("/health") == 200, 20, what=f"router /health ({self.tail()})")
        if wait_ready:
            wait_until(lambda: self._status("/ready") == 200, 20, what=f"router /ready ({self.tail()})")

    def _status(self, path: str) -> int | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"router exited with {self.proc.returncode}: {self.tail()}")
        try:
            return httpx.get(self.url + path, timeout=2).status_code
        except httpx.HTTPError:
            return None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def workers(self, headers: dict | None = None) -> dict:
        return httpx.get(self.url + "/workers", timeout=5, headers=headers).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_pd(log_dir: Path, n_prefill: int = 1, n_decode: int = 1, extra: list[str] = ()) -> list[MockProcess]:
    """Mock PD workers: prefills first, then decodes; each prefill with its own bootstrap port."""
    procs = []
    try:
        for _ in range(n_prefill):
            procs.append(MockProcess.start(["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                            str(free_port()), *extra], log_dir=log_dir, wait="ready"))
        for _ in range(n_decode):
            procs.append(MockProcess.start(["--disaggregation-mode", "decode", *extra], log_dir=log_dir,
                                           wait="ready"))
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def bootstrap_port(mock: MockProcess) -> str:
    return mock.argv[mock.argv.index("--disaggregation-bootstrap-port") + 1]


def pd_args(procs: list[MockProcess]) -> list[str]:
    args = ["--mode", "pd"]
    for p in procs:
        if "prefill" in p.argv:
            args += ["--prefill", p.url, bootstrap_port(p)]
        else:
            args += ["--decode", p.url]
    return args


def stats(mock: MockProcess) -> dict:
    return httpx.get(mock.url + "/mock/stats", timeout=5).json()


def post_in_thread(url: str, body: dict, out: dict, timeout: float = 30) -> threading.Thread:
    """POST /generate from a thread; status and body (or the error) land in ``out``."""
    def run() -> None:
        try:
            r = httpx.post(url + "/generate", json=body, timeout=timeout)
            out["status"], out["body"] = r.status_code, r.json()
        except Exception as err:  # recorded for the assertion message
            out["error"] = repr(err)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
