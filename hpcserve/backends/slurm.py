"""Slurm backend: sbatch the rendered script from inside the run dir; squeue/sacct for state; scancel.

All Slurm commands go through ``slurm_cmd`` (timeouts, one-line errors). Status asks ONE squeue call for
every job of interest; sacct is used only for jobs squeue no longer knows, and only if accounting exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hpcserve.backends.base import JobInfo, Run, register
from hpcserve.errors import BackendError

CMD_TIMEOUT = 30
SQUEUE_FMT = "%i|%T|%r|%N|%M|%l|%Z"


# What Slurm's clients say when they find no cluster from here (no slurm.conf, no configless DNS record).
NO_CLUSTER = ("Could not establish a configuration source", "Unable to process configuration file",
              "Unable to contact slurm controller")


def slurm_error(cmd: str, stderr: str, code: int) -> str:
    """One line for a failed Slurm client: its fatal (else first error) line in full, and the fix when no
    cluster is reachable from here at all (not a cluster profile problem)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fatal = next((x for x in lines if f"{cmd}: fatal:" in x), None) or (lines[0] if lines else f"exit {code}")
    fatal = fatal.removeprefix(f"{cmd}: fatal: ").removeprefix(f"{cmd}: error: ")
    if any(m in stderr for m in NO_CLUSTER):
        return (f"{cmd} finds no Slurm cluster from here ({fatal}); run on the cluster's login node or export "
                f"SLURM_CONF=/path/to/slurm.conf")
    return f"{cmd} failed: {fatal}"


def slurm_cmd(*argv: str, cwd: Path | None = None, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise BackendError(f"{argv[0]} not found: run on a Slurm login node (or start slurm/start-local-slurm.sh)")
    conf = (env or os.environ).get("SLURM_CONF")
    if conf and not os.path.isfile(conf):   # the clients would retry for 60 s before saying so
        raise BackendError(f"SLURM_CONF={conf} does not exist; export the path of the cluster's slurm.conf")
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        raise BackendError(f"{argv[0]} did not answer within {CMD_TIMEOUT}s; is slurmctld up?") from None
    if check and res.returncode != 0:
        raise BackendError(slurm_error(argv[0], res.stderr, res.returncode))
    return res


# Said of a job neither squeue nor sacct reports, so `status` explains the UNKNOWN instead of a blank reason.
FORGOTTEN = "not known to Slurm: never submitted here, or ended and forgotten (no accounting)"


def query_jobs(job_ids: list[str]) -> dict[str, JobInfo]:
    """One squeue call for all jobs; sacct (if accounting exists) only for the ones squeue forgot."""
    if not job_ids:
        return {}
    res = slurm_cmd("squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", SQUEUE_FMT, check=False)
    if res.returncode != 0 and "Invalid job id" not in res.stderr:
        raise BackendError(slurm_error("squeue", res.stderr, res.returncode))
    out: dict[str, JobInfo] = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 7 and (parts[0] in job_ids or parts[0].split("_")[0] in job_ids):   # array task ids
            out[parts[0]] = JobInfo(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], parts[6])
    missing = [j for j in job_ids if j not in out]
    if missing and shutil.which("sacct"):
        res = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State,NodeList"],
                             capture_output=True, text=True, timeout=CMD_TIMEOUT)
        if res.returncode == 0:   # accounting disabled -> non-zero: just leave them UNKNOWN
            for line in res.stdout.splitlines():
                jid, state, nodes = (line.split("|") + ["", "", ""])[:3]
                if jid in missing:
                    out[jid] = JobInfo(jid, state.split()[0] if state else "UNKNOWN", nodes=nodes)
    for j in job_ids:
        out.setdefault(j, JobInfo(j, "UNKNOWN", FORGOTTEN))
    return out


def time_left(job_id: str) -> float | None:
    """Seconds until the job's time limit (asked of squeue, so `scontrol update TimeLimit` is seen), or None
    when Slurm does not say (no limit, job unknown)."""
    from hpcserve.recipe.schema import slurm_time_seconds
    res = slurm_cmd("squeue", "-h", "-j", job_id, "-o", "%L", check=False)
    left = res.stdout.strip().splitlines()[0].strip() if res.returncode == 0 and res.stdout.strip() else ""
    try:
        return float(slurm_time_seconds(left))
    except ValueError:    # UNLIMITED, NOT_SET, INVALID
        return None


def _megabytes(mem: str) -> int:
    """Slurm memory units (default megabytes) to megabytes."""
    mem = mem.strip().upper()
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}.get(mem[-1:], None)
    return int(float(mem[:-1]) * scale) if scale is not None else int(mem)


def partition_shortfall(spec) -> str | None:
    """Why no node of the partition can run one agent step (its cores or memory exceed every node's), or None.
    Slurm accepts such a job and leaves it pending for ever (PartitionConfig), so ask sinfo first; when sinfo
    says nothing (no partition named, no such partition) sbatch decides as before."""
    if not spec.partition or not (spec.cpus_per_task or (spec.mem and spec.mem != "0")):
        return None
    res = slurm_cmd("sinfo", "-h", "-p", spec.partition, "-o", "%c %m", check=False)
    nodes = [line.split() for line in res.stdout.splitlines() if res.returncode == 0 and len(line.split()) == 2]
    if not nodes:
        return None
    cores = max(int(c.rstrip("+")) for c, _ in nodes)
    mem = max(int(m.rstrip("+")) for _, m in nodes)
    if spec.cpus_per_task and spec.cpus_per_task > cores:
        return (f"each node's step asks {spec.cpus_per_task} cores and partition {spec.partition}'s nodes have at "
                f"most {cores}: set cluster.cpus_per_node (or lower cluster.cpus_per_gpu) to at most {cores}")
    if spec.mem and spec.mem != "0" and _megabytes(spec.mem) > mem:
        return (f"each node's step asks {spec.mem} of memory and partition {spec.partition}'s nodes have at most "
                f"{mem}M: lower cluster.mem_per_node (0: all of a node's)")
    return None


# sbatch refusals whose fix is a known cluster field (the generic hint would send the user elsewhere)
REFUSAL_FIXES = {
    "CPU count per node can not be satisfied":
        "set cluster.cpus_per_node (or lower cluster.cpus_per_gpu) to at most the cores a node has",
    "Memory specification can not be satisfied":
        "lower cluster.mem_per_node to at most the memory a node has (0: all of it)",
}


class SlurmBackend:
    name = "slurm"
    time_limited = True
    attached = False

    def submit(self, run_dir: Path, plan, extra_args: list[str] = (), env: dict[str, str] | None = None,
               **kw) -> Run:
        if plan is not None and (short := partition_shortfall(plan.slurm)):
            raise BackendError(f"{short}; not submitted (run dir kept: {run_dir})")
        res = slurm_cmd("sbatch", "--parsable", *extra_args, "job.sbatch", cwd=run_dir, check=False, env=env)
        if res.returncode != 0:
            if any(m in res.stderr for m in NO_CLUSTER):
                raise BackendError(slurm_error("sbatch", res.stderr, res.returncode))
            msg = " ".join(line.removeprefix("sbatch: error: ").strip() for line in res.stderr.strip().splitlines())
            fix = next((f for m, f in REFUSAL_FIXES.items() if m in res.stderr),
                       "fix the cluster profile (partition, account, time)")
            raise BackendError(f"Slurm refused the job: {msg}; {fix} and resubmit (run dir kept: {run_dir})")
        job_id = res.stdout.strip().split(";")[0]
        run = Run(run_dir, self.name, job_id=job_id)
        run.save()
        return run

    @staticmethod
    def test_only(run_dir: Path) -> str:
        """`sbatch --test-only`: Slurm's verdict on the script without submitting (stderr text)."""
        res = slurm_cmd("sbatch", "--test-only", "job.sbatch", cwd=run_dir, check=False)
        if res.returncode != 0:
            raise BackendError(f"sbatch --test-only rejected {run_dir}/job.sbatch: {res.stderr.strip()}")
        return res.stderr.strip()

    @staticmethod
    def signal(job_id: str, sig: str = "TERM") -> None:
        """Graceful stop: the signal goes to the job's steps (the agents), not to the batch shell or srun,
        which would cut the drain short; the agents drain, exit 0, and the job completes."""
        slurm_cmd("scancel", f"--signal={sig}", job_id)

    @staticmethod
    def kill(job_id: str) -> None:
        slurm_cmd("scancel", job_id)

    cancel = kill

    @staticmethod
    def status(jobs: list[str]) -> dict[str, JobInfo]:
        return query_jobs(list(jobs))

    time_left = staticmethod(time_left)


register("slurm")(SlurmBackend)
