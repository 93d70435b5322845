"""Serve on the real local Slurm: submit, ready, query, status, cancel; multi-node ranks; time limit; a job
that cannot start; one squeue call for many jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from slurm_util import pd_recipe as _recipe
from slurm_util import requires_slurm, run_slurm

from hpcserve.api import cancel, submit, wait_ready
from hpcserve.backends.base import Run
from hpcserve.errors import BackendError
from hpcserve.status import collect

pytestmark = [pytest.mark.slurm, requires_slurm]


def _hpcserve(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _wait_final(run: Run, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [st] = collect([str(run.run_dir)])
        if st.slurm_state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", None, "UNKNOWN"):
            return st
        time.sleep(1)
    raise AssertionError(f"job {run.job_id} did not end in {timeout}s")


def test_submit_ready_query_status_cancel(tmp_path):
    [run] = submit(_recipe(tmp_path), run_dir=tmp_path / "run")
    try:
        ep = wait_ready(run, 150)
        r = httpx.post(ep["url"] + "/generate", json={"text": "Hello Slurm", "sampling_params": {"max_new_tokens": 8}},
                       timeout=30)
        assert r.status_code == 200 and r.json()["text"]
        res = _hpcserve("status", str(run.run_dir), "--json")
        assert res.returncode == 0, res.stderr
        [st] = json.loads(res.stdout)
        assert st["phase"] == "ready" and st["slurm_state"] == "RUNNING" and st["endpoint"] == ep["url"]
        by_id = {w["id"]: w for w in st["worker_list"]}
        assert by_id["prefill-0"]["role"] == "prefill" and by_id["prefill-0"]["node"] == 1
        assert by_id["decode-0"]["role"] == "decode" and by_id["decode-0"]["node"] == 2
        assert {w["state"] for w in by_id.values()} == {"ready"}
        assert st["workers"] == {"decode": {"ready": 1}, "prefill": {"ready": 1}}
    finally:
        final = cancel(run, wait=60)
    assert final == "COMPLETED"    # the agents drained and exited 0 (CANCELLED: the hard scancel after 60 s)
    [st] = collect([str(run.run_dir)])
    assert st.phase == "cancelled"
    for f in ("recipe.resolved.yaml", "plan.json", "job.sbatch", "logs/redis.log", "logs/router.log",
              "logs/prefill-0.log", "logs/decode-0.log", "logs/agent-node0.log", "logs/agent-node2.log"):
        assert (run.run_dir / f).exists(), f
    node1 = (run.run_dir / "logs/agent-node1.log").read_text()
    assert "SIGTERM" in node1 and "draining" in node1, node1[-2000:]


def test_prefill_spanning_two_nodes_gets_ranks_and_one_dist_init(tmp_path):
    [run] = submit(_recipe(tmp_path, prefill_nodes=2), run_dir=tmp_path / "run")
    try:
        wait_ready(run, 150)
        plan = json.loads((run.run_dir / "plan.json").read_text())
        w = next(x for x in plan["workers"] if x["id"] == "prefill-0")
        info = httpx.get(f"http://127.0.0.1:{w['port']}/server_info", timeout=10).json()
        ranks = info["ranks"] if "ranks" in info else info["mock"]["ranks"]
        argvs = [r["argv"] if isinstance(r, dict) else r for r in ranks]
        got = sorted((a[a.index("--node-rank") + 1], a[a.index("--dist-init-addr") + 1]) for a in argvs)
        assert [g[0] for g in got] == ["0", "1"]
        assert got[0][1] == got[1][1] == f"127.0.0.1:{w['dist_init_port']}"
    finally:
        cancel(run, wait=60)


def test_time_limit_drains_and_reports_timeout(tmp_path):
    [run] = submit(_recipe(tmp_path, "\n"), ["cluster.time=1", "timeouts.drain=10", "cluster.signal_seconds=20"],
                   run_dir=tmp_path / "run")
    wait_ready(run, 150)
    st = _wait_final(run, 200)
    assert st.phase == "timeout", (st.slurm_state, st.failure)
    # the agents' own records: they drained on the time-limit signal (not Slurm's kill at the limit)
    stopped = json.loads((run.run_dir / "stopped.json").read_text())
    assert stopped["signal"] == "SIGUSR2", stopped
    assert "SIGUSR2" in (run.run_dir / "logs/agent-node0.log").read_text()
    # Slurm signals every process of the step: the engines ignore USR2 and are drained by their agents
    for name in ("prefill-0", "decode-0"):
        assert "stop signal: draining" in (run.run_dir / f"logs/{name}.log").read_text(), name
    for agent_log in (run.run_dir / "logs").glob("agent-node*.log"):
        assert "exited with code -12" not in agent_log.read_text(), agent_log.name


def test_missing_model_path_fails_fast_with_reason(tmp_path):
    [run] = submit(_recipe(tmp_path), ["model.path=/nonexistent/model-dir"], run_dir=tmp_path / "run")
    with pytest.raises(BackendError, match="model path /nonexistent/model-dir does not exist on node"):
        wait_ready(run, 120)
    st = _wait_final(run, 60)
    assert st.phase == "failed" and "does not exist" in st.failure


def test_bad_partition_is_refused_with_reason(tmp_path):
    with pytest.raises(BackendError, match="Slurm refused the job: invalid partition specified: nosuch"):
        submit(_recipe(tmp_path), ["cluster.partition=nosuch"], run_dir=tmp_path / "run")
    assert (tmp_path / "run/plan.json").exists()     # the run dir was written before submitting


def test_status_of_20_jobs_is_one_squeue_call(tmp_path):
    ids = [run_slurm("sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "true").stdout.strip()
           for _ in range(20)]
    try:
        real = subprocess.run(["which", "squeue"], capture_output=True, text=True).stdout.strip()
        wrap = tmp_path / "bin"
        wrap.mkdir()
        count = tmp_path / "count"
        (wrap / "squeue").write_text(f"#!/bin/sh\necho call >> {count}\nexec {real} \"$@\"\n")
        (wrap / "squeue").chmod(0o755)
        env = dict(os.environ, PATH=f"{wrap}:{os.environ['PATH']}")
        res = _hpcserve("status", *ids, "--json", env=env)
        assert res.returncode == 0, res.stderr
        sts = json.loads(res.stdout)
        assert [s["job_id"] for s in sts] == ids and {s["phase"] for s in sts} == {"queued"}
        assert count.read_text().count("call") == 1
    finally:
        run_slurm("scancel", *ids, check=False)
