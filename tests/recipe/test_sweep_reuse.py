"""Sweeps inside one Slurm allocation restart only the worker groups that change between points.

Each test submits a 3-point sweep to the local Slurm cluster and reads what the agents recorded per point
(``point-NN/sweep-nodeR.json``: kept/stopped/started processes and their PIDs) plus the one rollup.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from proc_util import REPO, free_port_block
from slurm_util import requires_slurm

from hpcserve.api import load_plans, sweep_fits_one_allocation, submit
from hpcserve.backends.slurm import query_jobs
from hpcserve.render import render_sbatch

LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN")


def sweep_recipe(tmp_path: Path, name: str, decode: str, sweep: str) -> Path:
    base = free_port_block()
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""\
name: {name}
model: {{path: demo/m, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 0}}}}
cluster: {REPO / "slurm/clusters/local.yaml"}
prefill: {{replicas: 1, tp: 8}}
decode: {decode}
router: {{port: {base + 119}}}
ports: {{base: {base}}}
timeouts: {{startup: 60}}
benchmark: {{isl: 32, osl: 8, concurrency: [1, 4], num_prompts: 8, warmup: 1}}
sweep:
  {sweep}
""")
    return path


def run_to_end(run_dir: Path, recipe: Path, timeout: float = 300) -> str:
    [run] = submit(recipe, run_dir=run_dir)                 # one job for the whole sweep
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = query_jobs([run.job_id])[run.job_id].state
        if state not in LIVE:
            return state
        time.sleep(1)
    raise AssertionError(f"sweep job {run.job_id} still {state} after {timeout}s; see {run_dir}/logs")


def node_records(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads((run_dir / f"point-0{i}" / f"sweep-node{rank}.json").read_text()) for i in range(3)]


@pytest.mark.slurm
@requires_slurm
def test_engine_arg_sweep_keeps_prefill_router_and_redis(tmp_path):
    recipe = sweep_recipe(tmp_path, "reuse-args", "{replicas: 1, tp: 8, args: {context-length: 4096}}",
                          "decode.args.context-length: [4096, 8192, 16384]")
    run_dir = tmp_path / "run"
    state = run_to_end(run_dir, recipe)
    script = (run_dir / "job.sbatch").read_text()
    assert script.count("hpcserve node --sweep") == 1 and "--plan" not in script
    assert state == "COMPLETED", (run_dir / "sweep/result.json").read_text()

    head, dec = node_records(run_dir, 0), node_records(run_dir, 1)
    for name in ("prefill-0", "router", "redis"):                     # one process for the whole sweep
        assert len({r["pids"][name] for r in head}) == 1, (name, head)
    assert [r["kept"] for r in head] == [[], ["prefill-0", "router"], ["prefill-0", "router"]]
    # the control API is per point (its argv names the point): it reads that point's run dir
    assert [r["started"] for r in head] == [["router", "control", "prefill-0"], ["control"], ["control"]]
    assert len({r["pids"]["decode-0"] for r in dec}) == 3, dec        # a new decode server per point
    assert [(r["stopped"], r["started"]) for r in dec[1:]] == [(["decode-0"], ["decode-0"])] * 2
    for i, length in enumerate((4096, 8192, 16384)):                  # and it got that point's argument
        plan = json.loads((run_dir / f"point-0{i}/plan.json").read_text())
        argv = next(p["argv"] for p in plan["processes"] if p["name"] == "decode-0")
        assert argv[argv.index("--context-length") + 1] == str(length)

    rows = list(csv.DictReader((run_dir / "report/rollup.csv").open()))
    assert {r["run"] for r in rows} == {f"reuse-args[decode.args.context-length={n}]" for n in (4096, 8192, 16384)}
    assert len(rows) == 6 and sorted({int(r["concurrency"]) for r in rows}) == [1, 4]
    result = json.loads((run_dir / "sweep/result.json").read_text())
    assert [p["ok"] for p in result["points"]] == [True, True, True]


@pytest.mark.slurm
@requires_slurm
def test_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    # the middle point's decode server rejects its argument and exits: that point fails, the others run
    recipe = sweep_recipe(tmp_path, "reuse-fail", "{replicas: 1, tp: 8, restart: 0, args: {context-length: 4096}}",
                          'decode.args.context-length: [4096, "not-a-number", 8192]')
    run_dir = tmp_path / "run"
    state = run_to_end(run_dir, recipe)
    assert state == "FAILED"                                          # the job says a point failed
    failure = json.loads((run_dir / "point-01/failure.json").read_text())
    assert "decode-0" in failure["message"], failure
    assert not (run_dir / "point-00/failure.json").exists() and not (run_dir / "point-02/failure.json").exists()
    assert (run_dir / "point-02/done.json").exists()
    head = node_records(run_dir, 0)
    assert len({r["pids"]["prefill-0"] for r in head}) == 1           # the failure restarted nothing else
    rows = list(csv.DictReader((run_dir / "report/rollup.csv").open()))
    assert {r["run"] for r in rows} == {f"reuse-fail[decode.args.context-length={n}]" for n in (4096, 8192)}


def test_swept_ports_base_runs_one_job_per_point(tmp_path):
    # Redis lives for the whole sweep: points that move it cannot share one allocation
    recipe = sweep_recipe(tmp_path, "reuse-ports", "{replicas: 1, tp: 8}", "ports.base: [21000, 21200]")
    assert not sweep_fits_one_allocation([p for _, p in load_plans(recipe)])
    recipe = sweep_recipe(tmp_path, "reuse-topo", "{replicas: 1, tp: 8}", "decode.replicas: [1, 3]")
    assert sweep_fits_one_allocation([p for _, p in load_plans(recipe)])


def test_sweep_script_golden():
    # the one-allocation script: one agent step for the whole sweep, failed points make the job fail
    plans = [p for _, p in load_plans(REPO / "recipes/sweep-chunked-prefill.yaml",
                                      cluster=str(REPO / "slurm/clusters/local.yaml"), python="python3")]
    assert sweep_fits_one_allocation(plans)
    alloc = plans[0].model_copy(update={"slurm": plans[0].slurm.model_copy(
        update={"nodes": max(p.num_nodes for p in plans)})})
    text = render_sbatch(alloc, points=[(f"point-0{i}", p.num_nodes) for i, p in enumerate(plans)])
    path = REPO / "tests/golden/sweep-chunked-prefill-localprofile/job.sbatch"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; UPDATE_GOLDEN=1 if the change is intended"
    assert subprocess.run(["bash", "-n"], input=text, text=True, timeout=10).returncode == 0
    assert "#SBATCH --nodes=3\n" in text and text.count("\nsrun ") == 1


def test_restart_budget_alone_does_not_restart_a_process():
    from hpcserve.agent.sweep import spec_key
    from hpcserve.plan.model import ProcessSpec
    [(_, plan)] = load_plans(REPO / "recipes/local-demo.yaml", python="python3")
    spec = next(p for p in plan.processes if p.kind == "engine")
    same = spec_key(plan, spec)
    budget = ProcessSpec(**{**spec.model_dump(), "restart": spec.restart + 3, "critical": not spec.critical})
    assert spec_key(plan, budget) == same
    argv = ProcessSpec(**{**spec.model_dump(), "argv": [*spec.argv, "--max-running-requests", "8"]})
    assert spec_key(plan, argv) != same
