"""A batch whose driver dies ends the whole deployment within the documented bound (docs/cli.md): every node
agent, engine, router and Redis stop, every port is free again, and `hpcserve batch` exits non-zero naming
the failed stage. Local backend here; the same on the local Slurm in test_batch_stop_slurm.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proc_util import free_port_block, port_free, run_pids

# the verb's bound after a stage dies: the agents' drain (10 s) + the follow window + stop grace, with slack
VERB_BOUND = 90.0


def batch_recipe(tmp_path: Path, cluster: str, rows: int = 400, extra: str = "") -> tuple[Path, list[int]]:
    """A 2-node batch: Redis, router and the driver on node 0, the mock worker on node 1 (slow enough that the
    batch is still running when the test kills the driver). Returns the recipe and its ports."""
    base = free_port_block()
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"p{i}", "max_tokens": 8}) + "\n"
                           for i in range(rows)))
    p = tmp_path / "batch.yaml"
    p.write_text(f"""\
name: batch-stop
model: {{path: demo/m, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 1, decode-step-ms: 40, max-running: 4}}}}
cluster: {cluster}
workers: {{replicas: 1, tp: 1}}
router: {{port: {base - 5}, dedicated_node: true}}
ports: {{base: {base}}}
timeouts: {{startup: 90}}
batch: {{input: {inp}, output: {tmp_path / 'out.jsonl'}, concurrency: 4}}
{extra}""")
    return p, [base, base + 10, base - 5]


def driver_pid(run_dir: Path, timeout: float = 120.0) -> int:
    """The batch driver's pid, from the head agent's log ("started batch (pid N)"), once it answered a row."""
    deadline = time.monotonic() + timeout
    log = run_dir / "logs" / "agent-node0.log"
    while time.monotonic() < deadline:
        m = re.search(r"started batch \(pid (\d+)\)", log.read_text() if log.exists() else "")
        out = run_dir.parent / "out.jsonl"
        if m and out.exists() and out.stat().st_size > 0:
            return int(m.group(1))
        time.sleep(0.2)
    raise TimeoutError(f"no running batch driver in {log}")


def errors(stderr: str) -> int:
    """Error lines on stderr (the rest are progress lines)."""
    return sum(line.startswith("error: ") for line in stderr.splitlines())


def kill_driver_and_wait(verb: subprocess.Popen, run_dir: Path) -> tuple[int, str, float]:
    os.kill(driver_pid(run_dir), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        _, err = verb.communicate(timeout=VERB_BOUND)
    except subprocess.TimeoutExpired:
        verb.kill()
        verb.communicate()
        pytest.fail(f"hpcserve batch still running {VERB_BOUND:.0f}s after its driver was killed")
    return verb.returncode, err.decode(), time.monotonic() - t0


def test_local_driver_killed_ends_deployment_frees_ports_and_names_the_stage(tmp_path):
    recipe, ports = batch_recipe(tmp_path, "{backend: local, gpus_per_node: 0, address: 127.0.0.1}")
    run_dir = tmp_path / "run"
    verb = subprocess.Popen([sys.executable, "-m", "hpcserve", "batch", str(recipe), "--input",
                             str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                             "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        code, err, _ = kill_driver_and_wait(verb, run_dir)
    finally:
        if verb.poll() is None:
            verb.kill()
    assert code == 1, err
    assert "batch stage exited with code -9" in err and errors(err) == 1, err
    assert run_pids(run_dir) == [], "a process of the deployment is still running"
    assert [p for p in ports if not port_free(p)] == []
    fail = json.loads((run_dir / "failure.json").read_text())
    assert fail["node"] == 0 and "batch stage exited with code -9" in fail["message"]


def test_local_lost_worker_is_named_when_the_driver_gives_up(tmp_path):
    """The only worker dies (no restarts): the driver gives up, and the verb's line names the dead worker."""
    recipe, ports = batch_recipe(tmp_path, "{backend: local, gpus_per_node: 0, address: 127.0.0.1}")
    recipe.write_text(recipe.read_text().replace("workers: {replicas: 1, tp: 1}",
                                                 "workers: {replicas: 1, tp: 1, restart: 0}"))
    run_dir = tmp_path / "run"
    verb = subprocess.Popen([sys.executable, "-m", "hpcserve", "batch", str(recipe), "--input",
                             str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                             "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        driver_pid(run_dir)   # the batch is answering rows
        m = re.search(r"started workers-0 \(pid (\d+)\)", (run_dir / "logs/agent-node1.log").read_text())
        os.kill(int(m.group(1)), signal.SIGKILL)
        _, err = verb.communicate(timeout=VERB_BOUND)
    finally:
        if verb.poll() is None:
            verb.kill()
            verb.communicate()
    err = err.decode()
    assert verb.returncode == 1 and errors(err) == 1, err
    assert "batch gave up" in err and "(dead workers: workers-0 on node 1)" in err
    assert run_pids(run_dir) == [] and [p for p in ports if not port_free(p)] == []
