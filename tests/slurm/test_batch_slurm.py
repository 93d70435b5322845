"""Offline batch on the real local Slurm: a job requeued mid-batch still answers every id exactly once with the
right text; a 3-shard job array merges to the same output as one shard."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from proc_util import REPO, free_port_block
from slurm_util import requires_slurm, run_slurm

from hpcserve.api import prepare_batch, run_batch_job
from hpcserve.backends.slurm import SlurmBackend, query_jobs
from hpcserve.mock.model import SamplingParams, complete
from hpcserve.engine_shell.tokenizer import Prompt

pytestmark = [pytest.mark.slurm, requires_slurm]
LOCAL = str(REPO / "slurm/clusters/local.yaml")
ROWS = 2000


def _inputs(tmp_path: Path, n: int = ROWS) -> Path:
    p = tmp_path / "in.jsonl"
    with p.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i}: why?", "max_tokens": 8, "temperature": 0}) + "\n")
    return p


def _expected(n: int = ROWS) -> dict[str, str]:
    sp = SamplingParams.from_dict({"max_new_tokens": 8, "temperature": 0}, 16)
    return {f"q{i}": complete(Prompt.from_text(f"question {i}: why?"), sp).text for i in range(n)}


def _recipe(tmp_path: Path, mock: str) -> Path:
    base = free_port_block()
    p = tmp_path / "batch.yaml"
    p.write_text(f"""\
name: batch-slurm
model: {{path: demo/m, served_name: demo}}
engine: {{kind: mock, mock: {{{mock}}}}}
cluster: {LOCAL}
workers: {{replicas: 1}}
router: {{port: {base - 5}}}
ports: {{base: {base}}}
timeouts: {{startup: 90}}
batch: {{input: in.jsonl, output: out.jsonl, concurrency: 64, max_restarts: 3}}
""")
    return p


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _release_requeued(run, run_dir: Path) -> None:
    """Slurm holds a requeued job back (about two minutes): once it is pending, let it start at once, on
    another node (the first start's node refuses the same job until its revoked credential expires, "Job
    credential revoked")."""
    node = json.loads((run_dir / "hosts/node-0.json").read_text())["slurm_node"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and query_jobs([run.job_id])[run.job_id].state != "PENDING":
        time.sleep(0.5)
    run_slurm("scontrol", "update", f"JobId={run.job_id}", f"ExcNodeList={node}", "StartTime=now", check=False)


def test_requeue_mid_batch_keeps_exactly_once(tmp_path):
    _inputs(tmp_path)
    recipe = _recipe(tmp_path, "time-scale: 1, decode-step-ms: 20, max-running: 32")
    out, [(d, plan)] = prepare_batch(recipe, run_dir=tmp_path / "run")
    run = SlurmBackend().submit(d, plan)
    output = tmp_path / "out.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not output.exists() or output.read_text().count("\n") < 300):
        time.sleep(0.5)
    done_before = output.read_text().count("\n")
    assert 300 <= done_before < ROWS, "requeue must happen mid-batch"
    run_slurm("scontrol", "requeue", run.job_id)
    _release_requeued(run, d)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st = query_jobs([run.job_id])[run.job_id].state
        if st == "COMPLETED" and json.loads((d / "stopped.json").read_text()).get("batch_exit") == 0:
            break
        time.sleep(2)
    rows = _rows(output)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == ROWS
    assert {r["id"]: r["text"] for r in rows} == _expected()
    # the driver's own records: the first start stopped resumable, the requeued start took over exactly the rest
    first, second = [json.loads(line) for line in (d / "logs/batch.log").read_text().splitlines() if line.startswith("{")]
    assert first["stopped"] and not first["complete"] and first["ok"] >= 300
    assert second["complete"] and second["already_done"] == first["ok"] and second["ok"] == ROWS - first["ok"]


def test_time_limit_signal_self_requeues_and_resumes_exactly_once(tmp_path):
    """The batch job's own requeue (agent/stages.py): USR2 before the time limit stops the driver with rows
    left, the agent requeues its job, and the next start resumes where the first stopped. Proven from the
    agents' and the driver's records, not from timing. The job is cancelled after its second start."""
    _inputs(tmp_path)
    recipe = _recipe(tmp_path, "time-scale: 1, decode-step-ms: 20, max-running: 4")   # rows outlast a start
    out, [(d, plan)] = prepare_batch(recipe, ["cluster.time=1", "timeouts.drain=10", "cluster.signal_seconds=25"],
                                     run_dir=tmp_path / "run")
    run = SlurmBackend().submit(d, plan)
    log = d / "logs/agent-node0.log"

    def wait_log(needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and needle not in (log.read_text() if log.exists() else ""):
            time.sleep(1)
        assert needle in log.read_text(), log.read_text()[-3000:]
    try:
        wait_log(f"requeued job {run.job_id} (restart 1 of 3)", 150)
        _release_requeued(run, d)
        wait_log(f"requeued job {run.job_id} (restart 2 of 3)", 150)
    finally:
        run_slurm("scancel", run.job_id, check=False)
    first, second = [json.loads(line) for line in (d / "logs/batch.log").read_text().splitlines()
                     if line.startswith("{")][:2]
    assert first["stopped"] and not first["complete"] and 0 < first["ok"] < ROWS, first
    assert second["already_done"] == first["ok"] and second["ok"] > 0, second
    rows = _rows(tmp_path / "out.jsonl")
    assert len(rows) == len({r["id"] for r in rows}) == first["ok"] + second["ok"]
    expected = _expected()
    assert all(r["text"] == expected[r["id"]] for r in rows)


def test_three_shard_array_equals_one_shard(tmp_path):
    n = 600
    one, three = tmp_path / "one", tmp_path / "three"
    for d in (one, three):
        d.mkdir()
        _inputs(d, n)
    msg1 = run_batch_job(_recipe(one, "time-scale: 0"), [], run_dir=one / "run", timeout=300, echo=lambda m: None)
    msg3 = run_batch_job(_recipe(three, "time-scale: 0"), ["batch.shards=3"], run_dir=three / "run", timeout=300,
                         echo=lambda m: None)
    assert msg1.startswith("complete") and msg3.startswith("complete: 600 rows")
    merged = (three / "out.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in merged] == [f"q{i}" for i in range(n)]      # input order
    texts1 = {r["id"]: r["text"] for r in _rows(one / "out.jsonl")}
    assert {json.loads(x)["id"]: json.loads(x)["text"] for x in merged} == texts1 == _expected(n)
    assert (three / "run/job.sbatch").read_text().count("#SBATCH --array=0-2") == 1
