"""Smoke tests of the local multi-node Slurm cluster (slurm/start-local-slurm.sh)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slurm_util import job_state, requires_slurm, run_slurm, sbatch, scancel, squeue_state, wait_job_state

pytestmark = [pytest.mark.slurm, requires_slurm]

PLAIN_SCRIPT = """#!/bin/bash
#SBATCH --job-name=hpcserve-test-only
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=5
srun hostname
"""


def test_two_node_job_runs_one_task_per_node(tmp_path):
    out = tmp_path / "out.txt"
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "-D", str(tmp_path), "-o", str(out),
                 "--wrap", "srun bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME'")
    assert wait_job_state(job, {"COMPLETED"}, timeout=60) == "COMPLETED"
    rows = sorted(line.split() for line in out.read_text().splitlines() if line.strip())
    assert [r[0] for r in rows] == ["0", "1"]
    assert rows[0][1] != rows[1][1], rows  # two different slurmd nodes


def test_test_only_accepts_plain_script_and_rejects_bad_partition(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(PLAIN_SCRIPT)
    good = run_slurm("sbatch", "--test-only", str(script), check=False)
    assert good.returncode == 0, good.stderr
    assert "to start at" in good.stderr
    bad = run_slurm("sbatch", "--test-only", "--partition=no-such-partition", str(script), check=False)
    assert bad.returncode != 0
    assert "invalid partition" in bad.stderr.lower()


def test_scancel_ends_job_and_squeue_shows_cancelled(tmp_path):
    job = sbatch("-D", str(tmp_path), "-o", "/dev/null", "--wrap", "sleep 600")
    try:
        wait_job_state(job, {"RUNNING"}, timeout=60)
    finally:
        scancel(job)
    wait_job_state(job, {"CANCELLED"}, timeout=60)
    # the final state must come from squeue itself (MinJobAge keeps it), not only from sacct
    assert squeue_state(job) == "CANCELLED"


def test_failed_job_final_state_and_exit_code_in_squeue(tmp_path):
    job = sbatch("-D", str(tmp_path), "-o", "/dev/null", "--wrap", "exit 3")
    assert wait_job_state(job, {"FAILED"}, timeout=60) == "FAILED"
    # the batched status call the CLI makes: several ids, one line each, fields split by '|'
    other = sbatch("-D", str(tmp_path), "-o", "/dev/null", "--wrap", "true")
    wait_job_state(other, {"COMPLETED"}, timeout=60)
    proc = run_slurm("squeue", "-h", "-t", "all", "-j", f"{job},{other}", "-o", "%i|%T|%r|%N|%M|%l")
    rows = {line.split("|")[0]: line.split("|") for line in proc.stdout.splitlines()}
    assert rows[job][1] == "FAILED" and rows[other][1] == "COMPLETED", rows
    assert job_state(job) == "FAILED"


def test_unknown_job_has_no_state():
    assert squeue_state("999999") is None
    assert job_state("999999") is None


def test_status_of_a_job_slurm_does_not_know_says_why_it_is_unknown():
    res = subprocess.run([sys.executable, "-m", "hpcserve", "status", "999999", "--json"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    [st] = json.loads(res.stdout)
    assert (st["slurm_state"], st["phase"], st["run_dir"]) == ("UNKNOWN", "unknown", None)
    assert st["reason"].startswith("not known to Slurm: never submitted here, or ended and forgotten")


def test_time_limit_sends_signal_then_ends_job_as_timeout(tmp_path):
    # Slow by nature (60-90 s): slurmctld checks time limits every 30 s.
    marker = tmp_path / "usr2"
    script = f"""#!/bin/bash
#SBATCH --time=1
#SBATCH --signal=B:USR2@30
trap 'touch {marker}' USR2
while true; do sleep 1 & wait $!; done
"""
    job = sbatch("-D", str(tmp_path), "-o", "/dev/null", script=script)
    try:
        assert wait_job_state(job, {"TIMEOUT"}, timeout=150) == "TIMEOUT"
    finally:
        scancel(job)
    proc = run_slurm("squeue", "-h", "-t", "all", "-j", job, "-o", "%T|%r|%l")
    assert proc.stdout.strip() == "TIMEOUT|TimeLimit|1:00"
    assert marker.exists(), "the batch shell never got the --signal=B:USR2 warning"
