"""Time from the last worker answering /health to the router answering /ready (goal: under 1 s).

Starts the local demo (1 prefill + 1 decode mock) with the local backend and polls every worker's /health
and the router's /ready every 5 ms from outside, so the figure includes registration in Redis, the router's
registry following and its own health admission. Usage: python perf/startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from proc_util import demo_overrides  # noqa: E402

from hpcserve.api import prepare_run  # noqa: E402
from hpcserve.backends.local import LocalBackend  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def one_run(tmp: Path) -> tuple[float, float]:
    ov = demo_overrides(["cluster.backend=local"])
    [(d, plan)] = prepare_run(REPO / "recipes/local-demo.yaml", ov, run_dir=tmp)
    backend = LocalBackend()
    t0 = time.monotonic()
    backend.submit(d, plan)
    health = {w.id: f"http://127.0.0.1:{w.port}/health" for w in plan.workers}
    ready_url = f"http://127.0.0.1:{plan.router_port}/ready"
    healthy_at: dict[str, float] = {}
    try:
        with httpx.Client() as client:
            while time.monotonic() - t0 < 60:
                now = time.monotonic()
                for wid, url in health.items():
                    if wid not in healthy_at and _ok(client, url):
                        healthy_at[wid] = now
                if len(healthy_at) == len(health) and _ok(client, ready_url):
                    router_at = time.monotonic()
                    return max(healthy_at.values()) - t0, router_at - max(healthy_at.values())
                time.sleep(0.005)
        raise SystemExit("deployment did not become ready in 60 s")
    finally:
        backend.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    gaps = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as t:
            boot, gap = one_run(Path(t) / "run")
        gaps.append(gap)
        print(f"run {i}: workers healthy after {boot:.2f}s; router /ready {gap * 1000:.0f} ms later")
    print(json.dumps({"last_worker_healthy_to_router_ready_ms": {
        "min": round(min(gaps) * 1000), "max": round(max(gaps) * 1000)}, "goal_ms": 1000}))


if __name__ == "__main__":
    main()
