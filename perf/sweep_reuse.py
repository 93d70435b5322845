"""One-allocation sweep on the local Slurm: restarting only what changes vs starting every point from scratch.

Both jobs run the same 3-point sweep (--vary decode: decode engine args change, prefill/router/Redis do not;
--vary router: only the router's decode policy changes, every engine stays) with mock engines
that take --startup-delay seconds to come up (a stand-in for loading weights). "fresh" is what a sweep did before
`hpcserve node --sweep`: one srun of per-point agents per point, everything started anew. Prints the job's wall
time for each (sbatch to COMPLETED, same queue cost in both) and the ratio, from one run.

    eval "$(bash slurm/start-local-slurm.sh)"; python perf/sweep_reuse.py [--startup-delay 3] [--vary decode|router]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpcserve.api import prepare_run, sweep_fits_one_allocation  # noqa: E402
from hpcserve.backends.slurm import SlurmBackend, query_jobs  # noqa: E402
from hpcserve.render import atomic_write, render_sbatch  # noqa: E402

RECIPE = """\
name: sweep-bench
model: {{path: demo/m, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 0, startup-delay: {delay}}}}}
cluster: {cluster}
prefill: {{replicas: 1, tp: 8}}
decode: {{replicas: 1, tp: 8, args: {{context-length: 4096}}}}
router: {{port: {router}}}
ports: {{base: {base}}}
timeouts: {{startup: 120}}
benchmark: {{isl: 32, osl: 8, concurrency: [1, 4], num_prompts: 16, warmup: 1}}
sweep:
  {sweep}
"""
SWEEPS = {   # what changes between the points
    "decode": "decode.args.context-length: [4096, 8192, 16384]",              # decode restarts each point
    "router": "router.decode_policy: [least_load, round_robin, power_of_two]",  # only the router restarts
}


def write_job(top: Path, delay: float, base: int, fresh: bool, vary: str) -> None:
    recipe = top.parent / f"{top.name}.yaml"
    recipe.write_text(RECIPE.format(delay=delay, cluster=REPO / "slurm/clusters/local.yaml", router=base + 119,
                                    base=base, sweep=SWEEPS[vary]))
    dirs = prepare_run(recipe, run_dir=top)
    assert sweep_fits_one_allocation([p for _, p in dirs])
    first = dirs[0][1]
    alloc = first.model_copy(update={"slurm": first.slurm.model_copy(
        update={"nodes": max(p.num_nodes for _, p in dirs)})})
    text = render_sbatch(alloc, points=[(d.name, p.num_nodes) for d, p in dirs])
    if fresh:   # the old shape: one step of per-point agents per point
        steps = "".join(f'srun --nodes={p.num_nodes} --ntasks={p.num_nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 '
                        f'{first.python} -m hpcserve node --plan "$RUN_DIR/{d.name}/plan.json" '
                        f'--run-dir "$RUN_DIR/{d.name}" || rc=1\n' for d, p in dirs)
        text = re.sub(r"^srun .*?--sweep \"\$RUN_DIR\" \|\| rc=1\n", lambda _: steps, text, flags=re.S | re.M)
    (top / "logs").mkdir(exist_ok=True)
    atomic_write(top / "job.sbatch", text, mode=0o755)


def run_job(top: Path, timeout: float = 600) -> float:
    t0 = time.monotonic()
    run = SlurmBackend().submit(top, None)
    while time.monotonic() - t0 < timeout:
        state = query_jobs([run.job_id])[run.job_id].state
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
            if state != "COMPLETED":
                sys.exit(f"job {run.job_id} ended {state}; see {top}/logs")
            return time.monotonic() - t0
        time.sleep(0.25)
    sys.exit(f"job {run.job_id} did not finish within {timeout}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--startup-delay", type=float, default=3.0, help="mock engine start-up seconds")
    ap.add_argument("--base-port", type=int, default=27400)
    ap.add_argument("--vary", choices=sorted(SWEEPS), default="decode", help="what the points change")
    ap.add_argument("--out", type=Path, default=None, help="keep the run dirs here (default: a temp dir)")
    args = ap.parse_args()
    if not os.environ.get("SLURM_CONF"):
        sys.exit('no local Slurm: eval "$(bash slurm/start-local-slurm.sh)"')
    os.environ["PYTHONPATH"] = str(REPO)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.out or tmp
        walls = {}
        for name in ("fresh", "reuse"):
            top = Path(tmp) / name
            write_job(top, args.startup_delay, args.base_port, fresh=name == "fresh", vary=args.vary)
            walls[name] = run_job(top)
            print(f"{name:6s} 3 points: {walls[name]:6.1f} s job wall time ({walls[name] / 3:.1f} s per point)")
    print(f"reuse / fresh wall time: {walls['reuse'] / walls['fresh']:.2f} "
          f"(points vary {args.vary}; mock engine start-up {args.startup_delay:g} s)")


if __name__ == "__main__":
    main()
