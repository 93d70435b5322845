"""Router benchmark: the same PD load against the workers directly, our router and sglang-router, in one run.

    python perf/router.py [--requests 3000] [--concurrency 16] [--rounds 3] [--workers fake|mock]
                           [--layouts shared,pinned]

Workers: ``fake`` (default) is a purpose-built instant worker below (canned answers, a few microseconds per
request) so the routers' own cost is what gets measured; ``mock`` uses hpcserve.mock with --mock-time-scale 0.
"direct" is the load generator doing the PD dual dispatch itself (both POSTs, wait for both), the floor any
router adds to. Our router runs with every feature on: API key, concurrency limit + queue, metrics, active
health probes, cache_aware prefill / least_load decode policies, request ids.

Two CPU layouts, each a full pass: ``shared`` lets routers, workers and load generator compete for all CPUs
(on a 2-core box the harness then takes about half the CPU from the router it measures); ``pinned`` gives
the router under test CPU 0 to itself and the harness the others, like a head node whose clients and
workers are elsewhere: req/s there is what one router core sustains. Multi-process variants of our router
only run in the shared layout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import router_harness  # noqa: E402
from router_fake import run_load as _py_load, serve_fake  # noqa: E402

from hpcserve.engine_shell.launch import free_port as _free_port, http_status  # noqa: E402


API_KEY = "bench-secret-key"


# ---------------------------------------------------------------- orchestration
def _wait_http(port: int, path: str = "/health", timeout: float = 60.0, want: int = 200) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if http_status(f"http://127.0.0.1:{port}{path}") == want:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 200 on 127.0.0.1:{port}{path} within {timeout:g} s")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.cpus: dict[str, set[int] | None] = {"router": None, "harness": None}

    def start(self, argv: list[str], log: str, env: dict | None = None, part: str = "harness") -> subprocess.Popen:
        f = open(log, "wb")
        cpus = self.cpus[part]
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                             start_new_session=True,
                             preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def start_workers(procs: Procs, kind: str, logdir: Path, harness: Path | None) -> dict:
    pp, dp, bp = _free_port(), _free_port(), _free_port()
    py = sys.executable
    if kind == "fake" and harness is not None:
        procs.start(router_harness.serve_argv(harness, "prefill", pp, logdir), str(logdir / "prefill.log"))
        procs.start(router_harness.serve_argv(harness, "decode", dp, logdir), str(logdir / "decode.log"))
    elif kind == "fake":
        procs.start([py, __file__, "--serve-fake", "prefill", str(pp)], str(logdir / "prefill.log"))
        procs.start([py, __file__, "--serve-fake", "decode", str(dp)], str(logdir / "decode.log"))
    else:
        common = ["--model-path", "bench-model", "--host", "127.0.0.1", "--mock-time-scale", "0"]
        procs.start([py, "-m", "hpcserve.mock", *common, "--port", str(pp), "--disaggregation-mode", "prefill",
                     "--disaggregation-bootstrap-port", str(bp)], str(logdir / "prefill.log"))
        procs.start([py, "-m", "hpcserve.mock", *common, "--port", str(dp), "--disaggregation-mode", "decode"],
                    str(logdir / "decode.log"))
    _wait_http(pp)
    _wait_http(dp)
    return {"prefill_port": pp, "decode_port": dp, "bootstrap_port": bp}


def start_ours(procs: Procs, w: dict, logdir: Path, processes: int = 1) -> dict:
    port = _free_port()
    procs.start([sys.executable, "-m", "hpcserve.router", "--port", str(port), "--mode", "pd",
                 "--processes", str(processes),
                 "--prefill", f"http://127.0.0.1:{w['prefill_port']}", str(w["bootstrap_port"]),
                 "--decode", f"http://127.0.0.1:{w['decode_port']}", "--prefill-policy", "cache_aware",
                 "--decode-policy", "least_load", "--api-key-env", "BENCH_ROUTER_KEY", "--max-concurrency", "256",
                 "--queue-size", "1024", "--health-interval", "1", "--log-level", "warning"],
                str(logdir / f"ours-{processes}.log"), env={"BENCH_ROUTER_KEY": API_KEY}, part="router")
    _wait_http(port, "/ready")
    return {"kind": "router", "port": port, "key": API_KEY, "pid": procs.procs[-1].pid}


def start_sglang(procs: Procs, w: dict, logdir: Path) -> dict | None:
    import importlib.util
    if importlib.util.find_spec("sglang_router") is None:
        print("sglang-router is not installed (pip install sglang-router): skipping it")
        return None
    port = _free_port()
    procs.start([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                 "--pd-disaggregation", "--prefill", f"http://127.0.0.1:{w['prefill_port']}", str(w["bootstrap_port"]),
                 "--decode", f"http://127.0.0.1:{w['decode_port']}", "--prefill-policy", "cache_aware",
                 "--decode-policy", "round_robin", "--prometheus-port", str(_free_port()),
                 "--prometheus-host", "127.0.0.1", "--log-level", "warn"], str(logdir / "sglang-router.log"),
                part="router")
    _wait_http(port, "/health", timeout=120)
    return {"kind": "router", "port": port, "pid": procs.procs[-1].pid}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all threads) and its live children, from /proc."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds; req/s is the median round, ratios are also printed per round")
    ap.add_argument("--workers", choices=["fake", "mock"], default="fake")
    ap.add_argument("--latency-requests", type=int, default=1000, help="requests at concurrency 1 per target")
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--router-processes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                    help="our router with these --processes values (default 1,2)")
    ap.add_argument("--layouts", type=lambda v: v.split(","), default=["shared", "pinned"],
                    help="CPU layouts to run, comma-separated: shared, pinned (default both)")
    ap.add_argument("--harness", choices=["c", "python"], default="c",
                    help="load generator and fake workers: c (perf/harness.c, built with the system compiler; "
                         "a fraction of the CPU) or python (router_fake.py)")
    ap.add_argument("--serve-fake", nargs=2, metavar=("ROLE", "PORT"), help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.serve_fake:
        serve_fake(ns.serve_fake[0], int(ns.serve_fake[1]))
        return 0
    bad = [x for x in ns.layouts if x not in ("shared", "pinned")]
    if bad:
        print(f"unknown layout {bad[0]!r}: use shared, pinned or both", file=sys.stderr)
        return 2
    if "pinned" in ns.layouts and len(os.sched_getaffinity(0)) < 2:
        print("the pinned layout needs at least 2 CPUs: use --layouts shared", file=sys.stderr)
        return 2
    build_dir = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    try:
        ns.harness_bin = router_harness.build(build_dir) if ns.harness == "c" else None
        if ns.harness == "c" and ns.harness_bin is None:
            print("no C compiler (cc/gcc) found: using the Python harness (--harness python)")
            ns.harness = "python"
        for layout in ns.layouts:
            results, targets = run_layout(layout, ns)
            _report(results, ns, targets, layout)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return 0


def run_layout(layout: str, ns) -> tuple[dict, dict]:
    logdir = Path(tempfile.mkdtemp(prefix="bench-router-"))
    procs = Procs()
    mine = os.sched_getaffinity(0)
    if layout == "pinned":
        cpus = sorted(mine)
        procs.cpus = {"router": {cpus[0]}, "harness": set(cpus[1:])}
        os.sched_setaffinity(0, procs.cpus["harness"])  # the load generator runs in this process
    try:
        w = start_workers(procs, ns.workers, logdir, ns.harness_bin)
        targets = {"direct": {"kind": "direct", **w}}
        for n in ns.router_processes if layout == "shared" else [1]:
            targets["hpcserve" if n == 1 else f"hpcserve-{n}p"] = start_ours(procs, w, logdir, n)
        sg = None if ns.skip_sglang else start_sglang(procs, w, logdir)
        if sg:
            targets["sglang-router"] = sg
        results = asyncio.run(_measure(targets, ns, logdir))
    finally:
        procs.stop()
        os.sched_setaffinity(0, mine)
    shutil.rmtree(logdir, ignore_errors=True)
    return results, targets


async def _measure(targets: dict, ns, workdir: Path) -> dict:
    async def _run_load(t: dict, n: int, conc: int, stream: bool):
        if ns.harness_bin is not None:
            return await router_harness.run_load(ns.harness_bin, t, n, conc, stream, workdir)
        return await _py_load(t, n, conc, stream)

    results: dict = {}
    for stream in (False, True):
        for name, t in targets.items():  # warm-up: connections, caches, JIT-free but allocator-warm
            await _run_load(t, min(500, ns.requests), ns.concurrency, stream)
        for _ in range(ns.rounds):
            for name, t in targets.items():
                cpu0 = cpu_seconds(t["pid"]) if "pid" in t else 0.0
                rps, lat, err = await _run_load(t, ns.requests, ns.concurrency, stream)
                r = results.setdefault((stream, name), {"rps": [], "lat": [], "errors": 0, "cpu": 0.0})
                r["cpu"] += (cpu_seconds(t["pid"]) - cpu0) if "pid" in t else 0.0
                r["rps"].append(rps)
                r["lat"].extend(lat)
                r["errors"] += err
        for name, t in targets.items():  # the router's own delay, without CPU queueing: one at a time
            _, lat, err = await _run_load(t, ns.latency_requests, 1, stream)
            results[(stream, name)]["lat1"] = lat
            results[(stream, name)]["errors"] += err
    return results


def _report(results: dict, ns, targets: dict, layout: str) -> None:
    where = (f"{os.cpu_count()} CPUs shared by load generator, workers and router" if layout == "shared" else
             "router alone on CPU 0, load generator and workers on the other CPUs")
    print(f"\n=== layout {layout}: PD mode, {ns.workers} workers, {ns.harness} harness, concurrency "
          f"{ns.concurrency}, {ns.requests} requests x {ns.rounds} rounds per target, {where}")
    for stream in (False, True):
        print(f"\n{'streaming' if stream else 'non-streaming'}:")
        print(f"  {'target':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'errors':>8}"
              f"{'router CPU us/req':>19}{'+p50 ms @c1':>13}")
        base = results[(stream, "direct")]
        l50 = pct(base["lat1"], 0.5)
        b50, b99 = pct(base["lat"], 0.5), pct(base["lat"], 0.99)
        for name in targets:
            r = results[(stream, name)]
            rps = statistics.median(r["rps"])
            p50, p99 = pct(r["lat"], 0.5), pct(r["lat"], 0.99)
            r["median_rps"] = rps
            cpu = f"{r['cpu'] / len(r['lat']) * 1e6:.0f}" if name != "direct" else "-"
            print(f"  {name:<14}{rps:>9.0f}{p50 * 1e3:>9.3f}{p99 * 1e3:>9.3f}{(p50 - b50) * 1e3:>9.3f}"
                  f"{(p99 - b99) * 1e3:>9.3f}{r['errors']:>8}{cpu:>19}{(pct(r['lat1'], 0.5) - l50) * 1e3:>13.3f}")
        for name in [n for n in targets if n.startswith("hpcserve")]:
            ours = results[(stream, name)]
            if (stream, "sglang-router") in results:
                theirs = results[(stream, "sglang-router")]
                ratio = ours["median_rps"] / theirs["median_rps"]
                # rounds are interleaved, so round i of both ran under the same machine conditions
                paired = sorted(a / b for a, b in zip(ours["rps"], theirs["rps"]))
                cpu = (theirs["cpu"] / len(theirs["lat"])) / (ours["cpu"] / len(ours["lat"]))
                print(f"  {name} / sglang-router req/s: {ratio:.2f}x (goal >= 2.0x; per round "
                      f"{', '.join(f'{x:.2f}' for x in paired)}, median {statistics.median(paired):.2f}x); "
                      f"sglang-router uses {cpu:.2f}x the router CPU per request")
            print(f"  {name} / direct req/s: {ours['median_rps'] / base['median_rps']:.2f}x; added p50 "
                  f"{(pct(ours['lat'], 0.5) - b50) * 1e3:.3f} ms at concurrency {ns.concurrency}, "
                  f"{(pct(ours['lat1'], 0.5) - l50) * 1e3:.3f} ms at concurrency 1 (goal <= 0.5 ms)")


if __name__ == "__main__":
    sys.exit(main())
