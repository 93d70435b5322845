"""Time to validate + plan + render a 1,024-node recipe (goal: under 1 s).

Usage: python perf/render.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from hpcserve.api import load_plans
from hpcserve.render import render_sbatch

RECIPE = """\
name: huge
model: {path: /lustre/models/DeepSeek-V3}
engine: {kind: sglang, version: "0.5.23"}
cluster: {backend: slurm, partition: batch, time: "04:00:00", gpus_per_node: 8}
prefill: {replicas: 256, nodes: 2, tp: 16, args: {chunked-prefill-size: 32768, trust-remote-code: true}}
decode: {replicas: 512, tp: 8, dp: 8, args: {enable-dp-attention: true}}
router: {port: 8000}
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "huge.yaml"
        path.write_text(RECIPE)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            [(_, plan)] = load_plans(path, python="python3")
            script = render_sbatch(plan)
            data = plan.to_json()
            best = min(best, time.perf_counter() - t0)
        print(f"nodes={plan.num_nodes} processes={len(plan.processes)} plan.json={len(data) / 1e6:.1f} MB "
              f"script={len(script)} B")
        print(f"validate+plan+render best of 5: {best * 1000:.0f} ms (goal < 1000 ms)")


if __name__ == "__main__":
    main()
