"""Stages that run after the deployment is ready (the offline batch driver): skipping finished work,
what the driver's exit code means, and requeueing the job after preemption or the time-limit signal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

from hpcserve.agent.hosts import epoch
from hpcserve.plan.model import Plan, ProcessSpec
from hpcserve.rundir import RunPaths, atomic_write

log = logging.getLogger("hpcserve.agent")
STAGE_KINDS = ("batch", "bench")
# hpcserve.batch exit codes (docs/batch.md): 0 complete, 3 stopped with rows left, 4 gave up early.
STAGE_EXIT = {
    ("batch", 3): "batch stopped with rows left (resumable: resubmit or requeue)",
    ("batch", 4): "batch gave up: the router was unreachable or failing, or the output not writable (resumable)",
    ("bench", 1): "benchmark has invalid levels (see bench/ and logs/bench.log)",
}


def stage_failure(kind: str, code: int) -> str | None:
    """None when the stage succeeded, else why the job failed."""
    if code == 0:
        return None
    return STAGE_EXIT.get((kind, code), f"{kind} stage exited with code {code}; see logs/{kind}.log")


def _flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


def batch_already_complete(plan: Plan) -> bool:
    """True when every input row of this shard already has an output row: start no engine at all."""
    from hpcserve.batch import detect_complete
    for p in plan.processes:
        if p.kind == "batch":
            a = p.argv
            try:
                return detect_complete(_flag(a, "--input"), _flag(a, "--output"),
                                       int(_flag(a, "--shard-index", "0")), int(_flag(a, "--num-shards", "1")))
            except (OSError, ValueError) as e:
                log.warning("cannot check batch completeness: %s", e)
                return False
    return False


def job_ref() -> str | None:
    """The Slurm job this agent runs in as the login node names it (array task: ARRAYID_TASK), else None.
    `hpcserve batch` matches it against the run dir's records when Slurm can no longer say a job ended."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def write_done(run_dir: Path, message: str) -> None:
    atomic_write(run_dir / RunPaths.DONE, json.dumps({"epoch": epoch(), "message": message, "ts": time.time(),
                                                  "job": job_ref()}) + "\n")


def done_now(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / RunPaths.DONE).read_text()).get("epoch") == epoch()
    except (OSError, ValueError):
        return False


def stage_specs(plan: Plan, node: int) -> list[ProcessSpec]:
    return [p for p in plan.on_node(node) if p.kind in STAGE_KINDS]


def requeue_if_allowed(plan: Plan, batch_code: int | None, signal_name: str) -> bool:
    """After USR2 (time limit / preemption) with rows left, requeue the job, up to batch.max_restarts."""
    job = os.environ.get("SLURM_JOB_ID")
    # 3: the driver stopped with rows left; killed by a signal (the agent's stop can reach a driver that is
    # still finishing its rows in flight): also resumable, since the output is deduplicated by id on resume
    resumable = batch_code == 3 or (batch_code is not None and batch_code < 0)
    if plan.batch_max_restarts is None or not resumable or signal_name != "SIGUSR2" or not job:
        return False
    count = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if count >= plan.batch_max_restarts:
        log.warning("not requeueing: restart %d of batch.max_restarts=%d reached", count, plan.batch_max_restarts)
        return False
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, res.stderr.strip())
        return False
    log.info("requeued job %s (restart %d of %d)", job, count + 1, plan.batch_max_restarts)
    return True
