"""A 3-point sweep with a benchmark stage runs inside ONE Slurm allocation and yields one rollup + plots.
The points change the topology (2, 3, 4 nodes): the allocation has 4 nodes, nodes a point does not use stay
idle, and workers every point shares (prefill-0, decode-0, the router) keep running from point to point."""

from __future__ import annotations

import csv
import json
import time

import pytest
from proc_util import REPO, free_port_block
from slurm_util import requires_slurm

from hpcserve.api import submit
from hpcserve.backends.slurm import query_jobs

pytestmark = [pytest.mark.slurm, requires_slurm]


def test_three_point_sweep_in_one_allocation(tmp_path):
    base = free_port_block()
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(f"""\
name: sweep-local
model: {{path: demo/m, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 0}}}}
cluster: {REPO / "slurm/clusters/local.yaml"}
prefill: {{replicas: 1, tp: 8}}
decode: {{replicas: 1, tp: 8}}
router: {{port: {base + 119}}}
ports: {{base: {base}}}
timeouts: {{startup: 90}}
benchmark: {{isl: 32, osl: 8, concurrency: [1, 4], num_prompts: 8, warmup: 1}}
sweep:
  decode.replicas: [1, 2, 3]
""")
    runs = submit(recipe, run_dir=tmp_path / "run")
    assert len(runs) == 1                                   # one job for the whole sweep
    script = (tmp_path / "run/job.sbatch").read_text()
    assert "#SBATCH --nodes=4\n" in script and script.count("hpcserve node --sweep") == 1
    job = runs[0].job_id
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        state = query_jobs([job])[job].state
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
            break
        time.sleep(2)
    assert state == "COMPLETED", (tmp_path / "run/logs").iterdir()
    run = tmp_path / "run"
    pids = {(i, rank): json.loads((run / f"point-0{i}/sweep-node{rank}.json").read_text())["pids"]
            for i in range(3) for rank in range(4)}
    for name, rank in (("prefill-0", 0), ("router", 0), ("redis", 0), ("decode-0", 1)):
        assert len({pids[i, rank][name] for i in range(3)}) == 1, (name, pids)   # kept from point to point
    assert pids[0, 2] == pids[0, 3] == pids[1, 3] == {}                           # idle in smaller points
    assert pids[1, 2].keys() == {"decode-1"} and pids[2, 3].keys() == {"decode-2"}
    rows = list(csv.DictReader((tmp_path / "run/report/rollup.csv").open()))
    points = {r["run"] for r in rows}
    assert len(rows) == 6 and points == {f"sweep-local[decode.replicas={n}]" for n in (1, 2, 3)}, rows[:2]
    assert sorted({int(r["concurrency"]) for r in rows}) == [1, 4]
    assert all(float(r["output_tok_s"]) > 0 for r in rows if "output_tok_s" in r)
    assert len(list((tmp_path / "run/report").glob("*.png"))) >= 2
