"""Run-time addresses: each agent publishes its node's address in the shared run dir; argv placeholders
({addr}, {host:N}, {run_dir}, {run_id}) are filled from them. Node names from Slurm are never assumed to
resolve: the agent reports the address it can actually be reached at.

The address is chosen per node (``cluster.address``, see ``node_rule``). A multi-node job refuses a loopback
or link-local address found by ``auto`` or an interface: every other node would talk to itself. A literal IP
written in the profile is trusted, so the local test cluster (every node is this host) says 127.0.0.1."""

from __future__ import annotations

import asyncio
import ipaddress
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


def resolve_address(setting: str, nodes: int | None = None) -> str:
    """This node's address for ``cluster.address`` (see ``choose_address``), read from the live system.
    ``nodes``: how many nodes the job has; default Slurm's SLURM_NNODES (the local backend: one host)."""
    if nodes is None:
        nodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
    rule = node_rule(setting, node_names())
    if rule.startswith(INTERFACE):
        name = rule[len(INTERFACE):]
        addr = interface_address(name)
        if addr is None:
            raise BackendError(f"cluster.address: interface {name!r} has no IPv4 address on node "
                               f"{socket.gethostname()}; name another interface or give the IP")
        return checked(addr, nodes, f"interface {name}")
    if rule != "auto":
        return rule   # an IP the user wrote down (127.0.0.1 declares a single-host cluster: trusted)
    return choose_address(route_address(os.environ.get("SLURM_LAUNCH_NODE_IPADDR")), hostname_address(),
                          non_loopback_addresses(), nodes)


INTERFACE = "interface:"


def node_names() -> set[str]:
    """Names this node is known by: the hostname (short and full) and Slurm's node name."""
    host = socket.gethostname()
    return {n for n in (host, host.split(".")[0], os.environ.get("SLURMD_NODENAME")) if n}


def node_rule(setting: str, names: set[str]) -> str:
    """The rule for this node from ``cluster.address``: comma-separated entries, ``NODE=RULE`` for one node
    and a bare ``RULE`` for the others; a rule is ``auto``, ``interface:NAME`` or an IP."""
    default = "auto"
    for entry in (e.strip() for e in setting.split(",") if e.strip()):
        node, sep, rule = entry.partition("=")
        if not sep:
            default = entry
        elif node.strip() in names:
            return rule.strip()
    return default


def unroutable(addr: str) -> bool:
    """Loopback (127/8, e.g. the `127.0.1.1 hostname` line of /etc/hosts) or link-local (169.254/16)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified


def checked(addr: str, nodes: int, source: str) -> str:
    if nodes > 1 and unroutable(addr):
        raise BackendError(f"node address {addr} (from {source}) is loopback or link-local: the other "
                           f"{nodes - 1} node(s) of this job cannot reach it; set cluster.address to "
                           f"interface:NAME (e.g. interface:ib0) or NODE=IP entries")
    return addr


def choose_address(by_route: str | None, by_hostname: str | None, by_interface: list[str], nodes: int) -> str:
    """``auto``: the source address of the route to the head node (Slurm's launch node), else the hostname's
    address, else the first non-loopback interface address. A multi-node job never gets an address the
    other nodes cannot reach: a loopback or link-local answer is skipped and, if nothing else is left, an
    error. A single-node job may use loopback."""
    candidates = [("the route to the head node", by_route), ("the hostname", by_hostname)]
    candidates += [("a network interface", a) for a in by_interface]
    for _, addr in candidates:
        if addr and not (nodes > 1 and unroutable(addr)):
            return addr
    for source, addr in candidates:
        if addr:
            return checked(addr, nodes, source)
    raise BackendError(f"cannot find an address for node {socket.gethostname()}; set cluster.address to its IP")


def route_address(target: str | None) -> str | None:
    """Source address the kernel would use to reach ``target`` (UDP connect sends nothing)."""
    if not target:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def hostname_address() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def interface_address(name: str) -> str | None:
    """IPv4 address of one interface (SIOCGIFADDR), None when it has none or does not exist."""
    import fcntl
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def non_loopback_addresses() -> list[str]:
    out = []
    for _, name in socket.if_nameindex():
        addr = interface_address(name)
        if addr and not unroutable(addr):
            out.append(addr)
    return out


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
    names: dict[int, str] = {}
    while True:
        for r in ranks - out.keys():
            f = run_dir / "hosts" / f"node-{r}.json"
            try:
                info = json.loads(f.read_text())
                if info.get("epoch") == epoch():
                    out[r], names[r] = info["addr"], info.get("hostname", "")
            except (OSError, ValueError, KeyError):
                pass
        if len(out) == len(ranks):
            check_one_host_for_loopback(out, names)
            return out
        if loop.time() > deadline:
            missing = sorted(ranks - out.keys())
            raise BackendError(f"nodes {missing} never published their address within {timeout:.0f}s "
                               f"(their agents did not start; see logs/agent-node*.log)")
        await asyncio.sleep(0.2)


def check_one_host_for_loopback(addrs: dict[int, str], hostnames: dict[int, str]) -> None:
    """A loopback address written in the profile declares that every node is one host; nodes that turn out to
    run on different hosts could never reach each other, so say so instead of timing out later."""
    if any(unroutable(a) for a in addrs.values()) and len(set(hostnames.values()) - {""}) > 1:
        where = ", ".join(f"node {r} on {h}" for r, h in sorted(hostnames.items()))
        raise BackendError(f"cluster.address gives loopback addresses but the nodes are different hosts ({where}); "
                           f"set cluster.address to auto or interface:NAME")


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
