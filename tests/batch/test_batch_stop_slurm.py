"""`hpcserve batch` on the real local Slurm: a killed driver ends the job and the verb names it (finding 1),
and a sharded batch returns and merges with accounting on (the running cluster) and off (sacct unusable for
the verb, as on a cluster without slurmdbd: finding 10), reading job ends from the run dir's records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proc_util import REPO, port_free
from slurm_util import requires_slurm, squeue_state
from test_batch_stop import batch_recipe, errors, kill_driver_and_wait

from hpcserve.api import wait_batch_jobs
from hpcserve.errors import BackendError

pytestmark = [pytest.mark.slurm, requires_slurm]
LOCAL = str(REPO / "slurm/clusters/local.yaml")
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")


def verb(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpcserve", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def no_accounting_env(tmp_path: Path) -> dict:
    """PATH with an `sacct` that answers as Slurm's does when accounting_storage is none."""
    shim = tmp_path / "no-sacct"
    shim.mkdir()
    (shim / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    (shim / "sacct").chmod(0o755)
    return {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}


@pytest.mark.parametrize("accounting", ["on", "off"])
def test_slurm_driver_killed_ends_job_frees_ports_and_names_the_stage(tmp_path, accounting):
    recipe, ports = batch_recipe(tmp_path, LOCAL)
    run_dir = tmp_path / "run"
    p = verb(str(recipe), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--run-dir", str(run_dir), env=no_accounting_env(tmp_path) if accounting == "off" else None)
    try:
        code, err, _ = kill_driver_and_wait(p, run_dir)
    finally:
        if p.poll() is None:
            p.kill()
    job = json.loads((run_dir / "job.json").read_text())["job_id"]
    deadline = time.monotonic() + 30
    while squeue_state(job) in LIVE and time.monotonic() < deadline:
        time.sleep(0.5)
    assert squeue_state(job) not in LIVE
    assert code == 1 and "batch stage exited with code -9" in err and errors(err) == 1, err
    assert [p for p in ports if not port_free(p)] == []
    assert json.loads((run_dir / "failure.json").read_text())["job"] == job


@pytest.mark.parametrize("accounting", ["on", "off"])
def test_sharded_batch_returns_and_merges_with_accounting(tmp_path, accounting):
    rows = 300
    recipe, _ = batch_recipe(tmp_path, LOCAL, rows=rows)
    text = recipe.read_text().replace("time-scale: 1, decode-step-ms: 40", "time-scale: 0")
    recipe.write_text(text.replace("dedicated_node: true", "dedicated_node: false"))
    env = no_accounting_env(tmp_path) if accounting == "off" else None
    p = verb(str(recipe), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
             "--shards", "2", "--run-dir", str(tmp_path / "run"), "--timeout", "900", env=env)
    try:
        out, err = p.communicate(timeout=240)   # the tasks take seconds; without the fix: until --timeout
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("hpcserve batch --shards 2 did not return although both array tasks had ended")
    assert p.returncode == 0, err.decode()
    assert f"complete: {rows} rows (0 errors)" in out.decode()
    progress = [x for x in err.decode().splitlines() if x.startswith("batch: ")]   # shard parts, read on the login node
    assert progress[-1].startswith(f"batch: {rows}/{rows} rows done, 0 failed, ")
    merged = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert merged == [f"q{i}" for i in range(rows)]


def test_run_dir_records_end_jobs_slurm_has_forgotten(tmp_path):
    """Job ids squeue and sacct do not know (UNKNOWN): the stopped.json / failure.json of that job decide."""
    a, b = tmp_path / "shard-0000", tmp_path / "shard-0001"
    for d in (a, b):
        d.mkdir()
    (a / "stopped.json").write_text(json.dumps({"job": "999990_0", "requeued": False}))
    (b / "stopped.json").write_text(json.dumps({"job": "999990_1", "requeued": False}))
    (b / "failure.json").write_text(json.dumps({"job": "4_1", "node": 0, "message": "an older job's"}))
    wait_batch_jobs(["999990_0", "999990_1"], [a, b], timeout=60, poll=0.2)
    (b / "failure.json").write_text(json.dumps({"job": "999990_1", "node": 0, "message": "engine died"}))
    with pytest.raises(BackendError, match="batch failed on node 0: engine died"):
        wait_batch_jobs(["999990_0", "999990_1"], [a, b], timeout=60, poll=0.2)
    (a / "stopped.json").write_text(json.dumps({"job": "999990_0", "requeued": True}))
    with pytest.raises(BackendError, match="still running after 1s"):
        wait_batch_jobs(["999990_0"], [a], timeout=1, poll=0.2)
