"""Helpers for tests that use the local Slurm cluster (slurm/start-local-slurm.sh).

Import from a test module as `from slurm_util import requires_slurm, sbatch, ...` (pytest puts
tests/ on sys.path; tests/ has no __init__.py).

A cluster is "available" when SLURM_CONF is set and `sinfo` answers. tests/run.sh sets
HPCSERVE_REQUIRE_SLURM=1 when it started or reused a cluster: then an unreachable cluster fails
the Slurm tests instead of silently skipping them.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Iterable

import pytest

# States after which a job never changes again (squeue %T / sacct State spelling).
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})
CMD_TIMEOUT = 20.0  # seconds for any single Slurm command


def run_slurm(*args: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a Slurm client command with a timeout; text output captured."""
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


@functools.lru_cache(maxsize=1)
def slurm_available() -> bool:
    """True when SLURM_CONF is set and the controller answers `sinfo`."""
    conf = os.environ.get("SLURM_CONF")
    if not conf or not os.path.isfile(conf) or shutil.which("sinfo") is None:
        return False
    try:
        return run_slurm("sinfo", "-h", check=False, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _slurm_required() -> bool:
    return os.environ.get("HPCSERVE_REQUIRE_SLURM") == "1"


def _requires_slurm_mark():
    if _slurm_required():
        # tests/run.sh brought a cluster up: never skip, let a broken cluster fail the tests
        return pytest.mark.slurm
    return pytest.mark.skipif(
        not slurm_available(), reason='no local Slurm: eval "$(bash slurm/start-local-slurm.sh)"')


# Use as a decorator or in `pytestmark = [pytest.mark.slurm, requires_slurm]`.
requires_slurm = _requires_slurm_mark()


def sbatch(*args: str, script: str | None = None) -> str:
    """Submit with `sbatch --parsable ARGS` (script text on stdin if given); return the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True,
                          text=True, timeout=CMD_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def squeue_state(job_id: str) -> str | None:
    """State of a job as squeue sees it, including finished jobs still within MinJobAge
    (`squeue -t all`); None when squeue no longer knows the job."""
    proc = run_slurm("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T", check=False)
    lines = proc.stdout.split()
    return lines[0] if proc.returncode == 0 and lines else None


def sacct_state(job_id: str) -> str | None:
    """State of the job allocation from sacct (None without accounting or before it is
    recorded). 'CANCELLED by 0' is reduced to 'CANCELLED'."""
    if shutil.which("sacct") is None:
        return None
    proc = run_slurm("sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id), check=False)
    words = proc.stdout.split()
    return words[0] if proc.returncode == 0 and words else None


def job_state(job_id: str) -> str | None:
    """squeue first (one cheap call, works without accounting), sacct as fallback."""
    return squeue_state(job_id) or sacct_state(job_id)


def wait_job_state(job_id: str, states: str | Iterable[str], timeout: float = 60.0, poll: float = 0.3) -> str:
    """Poll until the job is in one of `states`; return that state.

    Raises RuntimeError when the job reaches another final state (it can never get there),
    TimeoutError after `timeout` seconds naming the last state seen."""
    wanted = {states.upper()} if isinstance(states, str) else {s.upper() for s in states}
    deadline = time.monotonic() + timeout
    state = None
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if state in FINAL_STATES:
            raise RuntimeError(f"job {job_id} ended as {state}, expected one of {sorted(wanted)}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s (last state {state})")
        time.sleep(poll)


def scancel(job_id: str) -> None:
    run_slurm("scancel", str(job_id), check=False)


def pd_recipe(tmp_path, extra: str = "", prefill_nodes: int = 1, span: int = 120):
    """A PD recipe on the local cluster profile: head (Redis + router) on its own node, one prefill and one
    decode replica of the mock engine, on a free port block of ``span`` ports (router on its last port)."""
    from proc_util import REPO, free_port_block
    base = free_port_block(span)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    text = f"""\
name: slurm-pd
model: {{path: {model}, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 0}}}}
cluster: {REPO / "slurm/clusters/local.yaml"}
prefill: {{replicas: 1, nodes: {prefill_nodes}, tp: {8 * prefill_nodes}}}
decode: {{replicas: 1, tp: 8}}
router: {{port: {base + span - 1}, dedicated_node: true}}
ports: {{base: {base}}}
timeouts: {{startup: 90}}
{extra}"""
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p
