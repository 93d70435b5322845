"""`hpcserve doctor RECIPE` on the login node: run the node checks on as many nodes as the job would get
(one srun step, in the current allocation if there is one big enough), then gather one line per failure.

Every wait is bounded: the allocation by srun --immediate, the checks by ``timeout``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hpcserve.doctor.directives import local_options, unknown_directives
from hpcserve.doctor.node import failure_lines, node_file, run_node
from hpcserve.errors import BackendError
from hpcserve.plan.model import Plan
from hpcserve.rundir import RunPaths, read_json


@dataclass
class DoctorReport:
    failures: list[str] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)     # node, hostname, findings

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary_lines(self) -> list[str]:
        out = []
        for n in self.nodes:
            findings = n.get("findings", [])
            passed = sum(1 for f in findings if f["status"] == "ok")
            skipped = [f"{f['check']} ({f['message']})" for f in findings if f["status"] == "skip"]
            failed = sum(1 for f in findings if f["status"] == "fail")
            head = "FAIL" if failed else "ok"
            out.append(f"{head} node {n['node']} ({n.get('hostname', '?')}): {passed} passed, {failed} failed"
                       + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
        return out


def inside_allocation(nodes: int) -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) and int(os.environ.get("SLURM_NNODES") or 0) >= nodes


def srun_argv(plan: Plan, run_dir: Path, queue_timeout: int) -> list[str]:
    """One task per node running the node checks; a new allocation shaped like the job's unless inside one."""
    n = plan.num_nodes
    argv = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    if inside_allocation(n):
        argv.append("--overlap")
    else:
        s = plan.slurm
        argv += [f"--job-name=doctor-{s.job_name}", "--time=10", f"--immediate={queue_timeout}"]
        argv += [f"--{k}={v}" for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                                            ("gpus-per-node", s.gpus_per_node)) if v]
        known = (local_options("srun") or ("", frozenset()))[1]
        argv += [d for d in s.directives if d.split("=", 1)[0] in known and d.split("=", 1)[0] != "--requeue"]
    return argv + [f"--chdir={run_dir}", plan.python, "-m", "hpcserve.doctor", "--plan", str(run_dir / RunPaths.PLAN),
                   "--run-dir", str(run_dir), "--quiet"]


def run_doctor(plan: Plan, run_dir: Path, slurm_needs: str | None = None, timeout: float = 600,
               queue_timeout: int = 300) -> DoctorReport:
    """Checks on every node of ``plan`` (written to ``run_dir``); the login node's own checks first."""
    report = DoctorReport()
    login = socket.gethostname()
    report.failures += [f"login ({login}): {line}" for line in unknown_directives(plan, slurm_needs)]
    if plan.backend == "local":   # every node is this host: no srun, no rendezvous
        for rank in range(plan.num_nodes):
            run_node(plan, run_dir, rank, reach=False)
        last = ""
    else:
        try:
            r = subprocess.run(srun_argv(plan, run_dir, queue_timeout), capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
            lines = (r.stderr or "").strip().splitlines()
            last = lines[-1] if lines else ""
        except FileNotFoundError:
            raise BackendError("srun not found: run hpcserve doctor on a login node of the cluster") from None
        except subprocess.TimeoutExpired:
            last = f"the checks did not finish within {timeout:.0f}s"
    for rank in range(plan.num_nodes):
        info = read_json(node_file(run_dir, rank))
        if info is None:
            report.failures.append(f"node {rank}: no report ({last or 'the step did not run there'}); "
                                   f"fix: see the srun error above, or the node's health (sinfo -R)")
            continue
        report.nodes.append(info)
        report.failures += failure_lines(rank, info.get("hostname", "?"), info.get("findings", []))
    return report
