"""GPU indices of the plan -> the devices Slurm gave this step.

The plan numbers a node's GPUs 0..gpus_per_node-1. On a shared (non-exclusive) node Slurm gives the step
some of the node's GPUs and says which in CUDA_VISIBLE_DEVICES (or SLURM_STEP_GPUS / SLURM_JOB_GPUS): plan
index i is the i-th of those, never physical GPU i, which may belong to another job.
"""

from __future__ import annotations

from collections.abc import Mapping

from hpcserve.errors import BackendError

ALLOCATION_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def allocation(environ: Mapping[str, str]) -> tuple[str, list[str]] | None:
    """(variable, device ids) of the GPUs this step may use, or None when nothing says (use plan indices)."""
    for var in ALLOCATION_VARS:
        raw = environ.get(var, "").strip()
        if raw and raw != "NoDevFiles":
            return var, [d.strip() for d in raw.split(",") if d.strip()]
    return None


def visible_devices(planned: str, environ: Mapping[str, str]) -> str:
    """CUDA_VISIBLE_DEVICES for a process the plan gives GPU indices ``planned`` (e.g. "2,3")."""
    given = allocation(environ)
    if given is None:
        return planned
    var, devices = given
    out = []
    for index in (int(i) for i in planned.split(",") if i.strip()):
        if index >= len(devices):
            raise BackendError(f"the plan uses GPU {index} of this node but Slurm gave the step "
                               f"{len(devices)} ({var}={','.join(devices)}); request whole nodes "
                               f"(sbatch --exclusive) or lower cluster.gpus_per_node to {len(devices)}")
        out.append(devices[index])
    return ",".join(out)
