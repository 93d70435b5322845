"""Bad input to the node agent: each gives a clear error in the logs and the exit status, never a hang."""

from __future__ import annotations

import json
import os
import socket
import time
import subprocess
import sys

import pytest
from proc_util import REPO, demo_overrides, pids_alive

from hpcserve.api import prepare_run, up
from hpcserve.errors import BackendError

DEMO = REPO / "recipes/local-demo.yaml"


def _agent(run_dir, rank, timeout=60):
    return subprocess.run([sys.executable, "-m", "hpcserve", "node", "--plan", str(run_dir / "plan.json"),
                           "--run-dir", str(run_dir), "--node-rank", str(rank)],
                          capture_output=True, text=True, timeout=timeout)


def test_node_rank_outside_plan(tmp_path):
    [(d, plan)] = prepare_run(DEMO, demo_overrides(), run_dir=tmp_path / "run")
    res = _agent(d, plan.num_nodes + 3)
    assert res.returncode == 2
    assert f"node rank {plan.num_nodes + 3} is outside the plan's {plan.num_nodes} nodes" in res.stderr
    assert "Traceback" not in res.stderr


def test_head_starts_nothing_once_another_node_failed_during_its_checks(tmp_path):
    """On Slurm a node whose preflight failed first ends the step, and the head may get there after its own
    checks passed: it must not start Redis, the router or an engine then (it did, for 50 ms, until the step's
    SIGTERM stopped them again)."""
    [(d, _)] = prepare_run(DEMO, demo_overrides(), run_dir=tmp_path / "run")
    failure = {"node": 1, "message": "preflight failed: node 1: ib_device: missing", "epoch": "local.0"}
    (d / "failure.json").write_text(json.dumps(failure) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT")}
    res = subprocess.run([sys.executable, "-m", "hpcserve", "node", "--plan", str(d / "plan.json"), "--run-dir",
                          str(d), "--node-rank", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1, res.stderr
    assert "not starting: another node failed" in (d / "logs/agent-node0.log").read_text()
    assert not (d / "redis.json").exists() and not list((d / "logs").glob("redis*.log"))
    assert json.loads((d / "failure.json").read_text()) == failure      # the cause the user sees is kept


def test_redis_unreachable(tmp_path):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    [(d, _)] = prepare_run(DEMO, demo_overrides([f"redis.url=redis://127.0.0.1:{dead_port}/0",
                                                 "timeouts.startup=3"]), run_dir=tmp_path / "run")
    res = _agent(d, 0)
    assert res.returncode == 1
    fail = json.loads((d / "failure.json").read_text())
    assert f"Redis at 127.0.0.1:{dead_port} unreachable after 3s" in fail["message"]
    assert "unreachable" in (d / "logs/agent-node0.log").read_text()


def test_port_in_use(tmp_path):
    for _ in range(20):   # other processes on this machine may grab a port between the check and the bind
        ov = demo_overrides()
        base = int(ov[0].split("=")[1])
        blocker = socket.socket()
        try:
            blocker.bind(("127.0.0.1", base))     # the run's Redis port
            break
        except OSError:
            blocker.close()
    blocker.listen()
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=rf"redis: port {base} on 127.0.0.1 is already in use"):
            up(DEMO, ov, run_dir=tmp_path / "run", timeout=60)
        # a bound, not a speed: the other agents gave up waiting for Redis once the head recorded the failure
        # (they used to sit out their 30 s wait for redis.json, and the verb waited for them)
        assert time.monotonic() - t0 < 20
    finally:
        blocker.close()


def test_engine_binary_missing(tmp_path):
    ov = demo_overrides(["engine.mock={}", "engine.kind=sglang", "engine.python=/nonexistent/python3"])
    with pytest.raises(BackendError, match=r"cannot start '/nonexistent/python3': not found on this node"):
        up(DEMO, ov, run_dir=tmp_path / "run", timeout=60)
    job = json.loads((tmp_path / "run/job.json").read_text())
    assert pids_alive(job["pids"]) == []
