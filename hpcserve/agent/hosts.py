"""Run-time addresses: each agent publishes its node's address in the shared run dir; argv placeholders
({addr}, {host:N}, {run_dir}, {run_id}) are filled from them. Node names from Slurm are never assumed to
resolve: the agent reports the address it can actually be reached at."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from pathlib import Path

from hpcserve.errors import BackendError
from hpcserve.rundir import atomic_write

_HOST = re.compile(r"\{host:(\d+)\}")


def epoch() -> str:
    """Which start of the job this is: files from before a requeue must not be trusted."""
    return f"{os.environ.get('SLURM_JOB_ID', 'local')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def resolve_address(setting: str) -> str:
    if setting != "auto":
        return setting
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        raise BackendError(f"cannot resolve this node's hostname {name!r}; set cluster.address to its IP") from None


def publish_address(run_dir: Path, rank: int, addr: str) -> None:
    d = run_dir / "hosts"
    d.mkdir(exist_ok=True)
    info = {"rank": rank, "addr": addr, "epoch": epoch(), "hostname": socket.gethostname(),
            "slurm_node": os.environ.get("SLURMD_NODENAME"), "pid": os.getpid()}
    atomic_write(d / f"node-{rank}.json", json.dumps(info, indent=1) + "\n")


async def wait_addresses(run_dir: Path, ranks: set[int], timeout: float) -> dict[int, str]:
    """Addresses of the given nodes, waiting for their agents to publish them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    out: dict[int, str] = {}
    while True:
        for r in ranks - out.keys():
            f = run_dir / "hosts" / f"node-{r}.json"
            try:
                info = json.loads(f.read_text())
                if info.get("epoch") == epoch():
                    out[r] = info["addr"]
            except (OSError, ValueError, KeyError):
                pass
        if len(out) == len(ranks):
            return out
        if loop.time() > deadline:
            missing = sorted(ranks - out.keys())
            raise BackendError(f"nodes {missing} never published their address within {timeout:.0f}s "
                               f"(their agents did not start; see logs/agent-node*.log)")
        await asyncio.sleep(0.2)


def needed_hosts(argvs: list[list[str]]) -> set[int]:
    return {int(m) for argv in argvs for a in argv for m in _HOST.findall(a)}


def fill(argv: list[str], addr: str, hosts: dict[int, str], extra: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        a = _HOST.sub(lambda m: hosts[int(m.group(1))], a).replace("{addr}", addr)
        for k, v in extra.items():
            a = a.replace("{" + k + "}", v)
        out.append(a)
    return out


def check_port_free(addr: str, port: int, what: str) -> None:
    """Fail early and clearly instead of letting a server die on bind later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers do: TIME_WAIT is not "in use"
        try:
            s.bind((addr, port))
        except OSError:
            raise BackendError(f"{what}: port {port} on {addr} is already in use (another run?); "
                               f"change ports.base or router.port") from None


def check_ports_free(addr: str, specs) -> None:
    """Every port of these process specs is free on this node (one clear error for the first that is not)."""
    for spec in specs:
        for what, port in spec.ports.items():
            check_port_free(addr, port, f"{spec.name} {what}")
