"""A recipe's `benchmark:` section runs after readiness on the head node, writes results into the run dir
and ends the deployment."""

from __future__ import annotations

import csv
import json
import time

from proc_util import demo_overrides

from hpcserve.api import prepare_run
from hpcserve.backends.local import LocalBackend


def test_benchmark_stage_writes_results_and_ends_the_job(tmp_path):
    recipe = tmp_path / "bench.yaml"
    recipe.write_text("""\
name: bench-stage
model: {path: demo/m, served_name: demo}
engine: {kind: mock, mock: {time-scale: 0}}
cluster: {backend: local, gpus_per_node: 0, address: 127.0.0.1}
prefill: {replicas: 1}
decode: {replicas: 1}
benchmark: {isl: 64, osl: 8, concurrency: [1, 4], num_prompts: 8, warmup: 1}
""")
    [(d, plan)] = prepare_run(recipe, demo_overrides(), run_dir=tmp_path / "run")
    kinds = [p.kind for p in plan.processes if p.node == 0]
    assert kinds[:2] == ["redis", "router"] and "bench" in kinds   # (and the control API)
    backend = LocalBackend()
    backend.submit(d, plan)
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in backend.procs) and time.monotonic() < deadline:
        time.sleep(0.3)
    codes = backend.stop()
    assert codes == [0, 0], (d / "logs/bench.log").read_text()[-2000:]
    stopped = json.loads((d / "stopped.json").read_text())
    assert stopped["why"] == "bench complete"
    rollups = list((d / "bench").rglob("rollup.csv"))
    assert rollups
    rows = list(csv.DictReader(rollups[0].open()))
    assert sorted(int(r["concurrency"]) for r in rows) == [1, 4]
