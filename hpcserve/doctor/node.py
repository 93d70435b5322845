"""`python -m hpcserve.doctor --plan PLAN --run-dir DIR`: the checks on one node (run on every node by srun or
by the node agent), its findings written to DIR/doctor/node-<rank>.json, failures printed one per line.

Reach: the head node listens on the Redis port (which nobody uses yet) and publishes its address; every other
node connects to it. The head stays up until each node has reported or ``reach_timeout`` has passed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from hpcserve.doctor.checks import CHECKS, IN_JOB_SKIPS, Finding, NodeContext, run_checks
from hpcserve.plan.model import Plan
from hpcserve.rundir import RunPaths, atomic_write, read_json

EXIT_OK, EXIT_FAILED = 0, 2
CONNECT_TIMEOUT = 5.0


def doctor_dir(run_dir: Path) -> Path:
    d = Path(run_dir) / RunPaths.DOCTOR
    d.mkdir(parents=True, exist_ok=True)
    return d


def node_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RunPaths.DOCTOR / f"node-{rank}.json"


def _head_target(ctx: NodeContext) -> tuple[str, int] | None:
    """Where every node must reach the head: the run's Redis (ours on the head node, or the external one)."""
    p = ctx.plan
    if p.redis_url:
        u = urlparse(p.redis_url)
        return (u.hostname or "", u.port or 6379)
    return None


def reach_as_head(ctx: NodeContext, timeout: float) -> list[Finding]:
    """Listen on the Redis port, publish where, accept the other nodes until all have reported."""
    if ctx.addr is None or ctx.plan.redis_port is None:
        return []
    d = doctor_dir(ctx.run_dir)
    try:
        srv = socket.create_server((ctx.addr, ctx.plan.redis_port))
    except OSError as e:
        return [Finding("reach", "fail", f"cannot listen on {ctx.addr}:{ctx.plan.redis_port} ({e.strerror})",
                        "free the Redis port (ports.base) on the head node")]
    with srv:
        srv.settimeout(0.2)
        atomic_write(d / "head.json", json.dumps({"addr": ctx.addr, "port": ctx.plan.redis_port,
                                                  "hostname": ctx.hostname, "ts": time.time()}) + "\n")
        others = [r for r in range(ctx.plan.num_nodes) if r != ctx.rank]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(node_file(ctx.run_dir, r).exists() for r in others):
            try:
                conn, _ = srv.accept()
                conn.close()
            except (socket.timeout, OSError):
                pass
    return []


def reach_head(ctx: NodeContext, timeout: float) -> list[Finding]:
    """Resolve and connect to the head node's Redis port (or the external Redis)."""
    target = _head_target(ctx)
    if target is None:
        deadline = time.monotonic() + timeout
        head = None
        while time.monotonic() < deadline:
            head = read_json(Path(ctx.run_dir) / RunPaths.DOCTOR / "head.json")
            if head:
                break
            time.sleep(0.2)
        if not head:
            return [Finding("reach", "fail", f"the head node (node {ctx.plan.head_node}) published no address "
                            f"within {timeout:.0f}s", "see the head node's line above")]
        try:
            socket.gethostbyname(head["hostname"])
        except OSError:
            return [Finding("reach", "fail", f"the head node's name {head['hostname']!r} does not resolve here",
                            "fix DNS or /etc/hosts on this node")]
        target = (head["addr"], int(head["port"]))
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        return [Finding("reach", "fail", f"cannot reach the head node's Redis port {host}:{port} "
                        f"({e.strerror or 'timed out'})", "open the port between nodes, or set cluster.address "
                        "to an interface the nodes share (interface:NAME)")]
    return [Finding("reach", "ok", f"{host}:{port}")]


def run_node(plan: Plan, run_dir: Path, rank: int, reach: bool, reach_timeout: float = 60.0,
             in_job: bool = False) -> list[Finding]:
    """Every check on this node; ``reach``: also the rendezvous with the head node (not in a job, where Redis
    itself is the rendezvous, nor on one host)."""
    ctx = NodeContext(plan, rank, Path(run_dir))
    findings = run_checks(ctx, [n for n in CHECKS if not (in_job and n in IN_JOB_SKIPS)])
    if reach and plan.num_nodes > 1:
        findings += reach_as_head(ctx, reach_timeout) if ctx.is_head else reach_head(ctx, reach_timeout)
    doctor_dir(run_dir)
    atomic_write(node_file(run_dir, rank),
                 json.dumps({"node": rank, "hostname": ctx.hostname, "findings": [f.__dict__ for f in findings]},
                            indent=1) + "\n")
    return findings


def failure_lines(rank: int, hostname: str, findings: list[dict]) -> list[str]:
    return [Finding(**f).line(rank, hostname) for f in findings if f["status"] == "fail"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcserve.doctor")
    p.add_argument("--plan", type=Path, required=True, help="plan.json, or - to read it from stdin")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--node-rank", type=int, default=None, help="default: SLURM_NODEID")
    p.add_argument("--in-job", action="store_true", help="run by the node agent: no reach rendezvous")
    p.add_argument("--quiet", action="store_true", help="no output, only the exit status and node-<rank>.json")
    p.add_argument("--reach-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    try:
        plan = Plan.from_json(sys.stdin.buffer.read() if str(args.plan) == "-" else args.plan.read_bytes())
    except (OSError, ValueError) as e:
        print(f"error: cannot read plan {args.plan}: {e}", file=sys.stderr)
        return EXIT_FAILED
    rank = args.node_rank if args.node_rank is not None else int(os.environ.get("SLURM_NODEID", "0"))
    findings = run_node(plan, (args.run_dir or args.plan.parent).resolve(), rank, not args.in_job,
                        args.reach_timeout, in_job=args.in_job)
    lines = failure_lines(rank, socket.gethostname(), [f.__dict__ for f in findings])
    for line in lines if not args.quiet else []:
        print(line, flush=True)
    return EXIT_FAILED if lines else EXIT_OK
