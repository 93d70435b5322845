"""Helpers for tests that run real local processes: free ports, recipes on free ports, process checks."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port_block(span: int = 120) -> int:
    """A base port whose next ``span`` ports are free now (below the ephemeral range)."""
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(200):
        base = rng.randrange(22000, 32000 - span, 10)
        if all(port_free(base + i) for i in range(0, span, 1)):
            return base
    raise RuntimeError("no free port block")


def demo_overrides(extra: list[str] = ()) -> list[str]:
    """local-demo on a free port range: redis/workers at base, router at base+span-1."""
    base = free_port_block()
    return [f"ports.base={base}", f"router.port={base + 119}", "timeouts.startup=60", *extra]


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return bool(pids_alive([pid]))


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    """pred()'s first truthy value, polling; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (from /proc), for orphan checks."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().split(") ", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_pids(run_dir: Path) -> list[int]:
    """Processes whose command line mentions this run dir (agents, engines, router, redis conf)."""
    out = []
    needle = str(run_dir).encode()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if needle in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return pids_alive(out)


class RedisProcess:
    """A redis-server of the test's own on 127.0.0.1 (binary found like the node agent finds it): start,
    SIGKILL, start again. ``password`` sets requirepass."""

    def __init__(self, tmp_path: Path, port: int | None = None, password: str | None = None,
                 name: str = "redis-ext") -> None:
        from hpcserve.agent.redis_server import url_of
        from hpcserve.engine_shell.launch import free_port
        self.port = port or free_port()
        self.url = url_of("127.0.0.1", self.port, password)
        self.conf = tmp_path / f"{name}.conf"
        self.conf.write_text(f"bind 127.0.0.1\nport {self.port}\nsave \"\"\nappendonly no\ndir {tmp_path}\n"
                             + (f"requirepass {password}\n" if password else ""))
        self.log = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisProcess":
        import redis

        from hpcserve.agent.redis_server import find_redis_server
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([find_redis_server(), str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        r = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if r.ping():
                        return self
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer: {self.log.read_text()[-500:]}")
                time.sleep(0.05)
        finally:
            r.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
