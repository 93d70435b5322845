"""The Dynamo stack on the real local Slurm: Dynamo's frontend + dynamo.mocker workers from the example
recipes, ready from Dynamo's own signals, answering the OpenAI SDK, visible in `hpcserve status`, a killed
worker restarted and back in the frontend's list, `hpcserve bench`/`report` beside today's stack, and a
cancel that leaves nothing running."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from slurm_util import requires_slurm

from hpcserve.api import cancel, submit, wait_ready
from hpcserve.engines.dynamo_model import make_byte_model
from hpcserve.stacks.dynamo import count_instances
from hpcserve.status import collect

pytest.importorskip("dynamo.frontend", reason="ai-dynamo not installed (tests/run.sh install_dynamo)")
openai = pytest.importorskip("openai")
from proc_util import REPO, free_port_block, pid_alive, port_free  # noqa: E402

pytestmark = [pytest.mark.slurm, requires_slurm]
STARTED = re.compile(r"started (\S+) \(pid (\d+)\)")


def _submit(tmp, recipe: str, name: str, *extra: str):
    base = free_port_block()
    model = make_byte_model(tmp / "model")
    [run] = submit(REPO / "recipes" / recipe, [f"model.path={model}", f"ports.base={base}",
                                               f"router.port={base + 119}", *extra], run_dir=tmp / name)
    return run


def _hpcserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True, timeout=120)


def _pids(run_dir: Path) -> dict[str, list[int]]:
    """Every process the agents started, by name (from their logs; restarts add pids)."""
    out: dict[str, list[int]] = {}
    for log in (run_dir / "logs").glob("agent-node*.log"):
        for name, pid in STARTED.findall(log.read_text()):
            out.setdefault(name, []).append(int(pid))
    return out


def _generate_ids(url: str, component: str) -> set:
    h = httpx.get(url + "/health", timeout=5).json()
    assert count_instances(h, component) == len({i["instance_id"] for i in h["instances"]
                                                 if i["endpoint"] == "generate" and i["component"] == component})
    return {i["instance_id"] for i in h["instances"] if i["endpoint"] == "generate" and i["component"] == component}


def _openai_both_ways(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello Dynamo"}],
                                       max_tokens=8)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length" and r.choices[0].message.content
    chunks = list(client.completions.create(model="tiny", prompt="Hello Slurm", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "".join(c.choices[0].text for c in chunks if c.choices)   # the mocker's ids decode to text


def _assert_cancelled_clean(run, started: dict[str, list[int]], ports: list[int]) -> None:
    assert cancel(run, wait=60) == "COMPLETED"   # drained and exited 0, not the hard scancel
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(pid_alive(p) for ps in started.values() for p in ps):
        time.sleep(0.3)
    assert [n for n, ps in started.items() for p in ps if pid_alive(p)] == []
    assert [p for p in ports if not port_free(p)] == []
    [st] = collect([str(run.run_dir)])
    assert st.phase == "cancelled"


@pytest.fixture(scope="module")
def agg(tmp_path_factory):
    """The aggregated Dynamo deployment and today's stack on the same recipe shape, submitted together."""
    tmp = tmp_path_factory.mktemp("dynamo")
    runs = {"dynamo": _submit(tmp, "dynamo-agg.yaml", "dyn"), "sglang": _submit(tmp, "dynamo-agg.yaml", "sgl",
                                                                              "stack=sglang")}
    try:
        eps = {k: wait_ready(r, 120) for k, r in runs.items()}
        yield {k: (r, eps[k]) for k, r in runs.items()}
    finally:
        for r in runs.values():
            cancel(r, wait=60)


def test_agg_ready_from_frontend_answers_openai_and_shows_workers(agg):
    run, ep = agg["dynamo"]
    plan = json.loads((run.run_dir / "plan.json").read_text())
    assert plan["stack"] == "dynamo" and plan["engine"] == "dynamo-mocker"
    assert [p["argv"][2] for p in plan["processes"] if p["kind"] in ("router", "engine")] == \
        ["dynamo.frontend", "dynamo.mocker", "dynamo.mocker"]
    assert len(_generate_ids(ep["url"], "backend")) == 2           # both workers behind the frontend
    # file discovery on the run dir, one store per start of the job (Slurm job id . restart count)
    assert [p.relative_to(run.run_dir).parts for p in (run.run_dir / "dynamo").glob("*/v1/instances")] == \
        [("dynamo", f"{run.job_id}.0", "v1", "instances")]
    _openai_both_ways(ep["url"])
    res = _hpcserve("status", str(run.run_dir), "--json")
    assert res.returncode == 0, res.stderr
    [st] = json.loads(res.stdout)
    assert st["phase"] == "ready" and st["endpoint"] == ep["url"]
    assert sorted((w["id"], w["role"], w["state"]) for w in st["worker_list"]) == \
        [("workers-0", "both", "ready"), ("workers-1", "both", "ready")]
    # the offline batch driver: chat rows go to /v1/chat/completions; with --api completions (what the plan
    # writes for a Dynamo stack) prompt and input_ids rows go to /v1/completions, as the frontend has no /generate
    rows = run.run_dir.parent / "rows.jsonl"
    kinds = [{"messages": [{"role": "user", "content": "a chat row"}]}, {"prompt": "a prompt row"},
             {"input_ids": [40, 41, 42, 43]}, {"prompt": "sampling params", "sampling_params": {"max_new_tokens": 5}}]
    rows.write_text("".join(json.dumps({"id": f"r{i}", "max_tokens": 5, **kinds[i % 4]}) + "\n" for i in range(8)))
    res = subprocess.run([sys.executable, "-m", "hpcserve.batch", "--input", str(rows), "--output",
                          str(rows.with_suffix(".out")), "--router", ep["url"], "--concurrency", "4",
                          "--api", "completions"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    out = [json.loads(line) for line in rows.with_suffix(".out").read_text().splitlines()]
    assert sorted((o["id"], o.get("error"), o["usage"]["completion_tokens"], o["finish_reason"]) for o in out) == \
        [(f"r{i}", None, 5, "length") for i in range(8)]
    assert [o["usage"]["prompt_tokens"] for o in sorted(out, key=lambda o: o["id"])][2] == 4   # the ids as sent
    res = _hpcserve("logs", str(run.run_dir), "--role", "router", "-n", "400")   # the frontend's own log
    assert res.returncode == 0 and "dynamo_runtime" in res.stdout and "\x1b[" not in res.stdout, res.stderr


def test_bench_both_stacks_and_one_report(agg, tmp_path):
    outs = []
    for stack, (run, _) in agg.items():
        out = tmp_path / f"bench-{stack}"
        res = _hpcserve("bench", str(run.run_dir), "--isl", "64", "--osl", "16",
                        "--concurrency", "1,4", "--num-prompts", "8", "--warmup", "1", "--label", f"{stack} stack",
                        "-o", str(out))
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        outs.append(str(out))
    res = _hpcserve("report", *outs, "-o", str(tmp_path / "report"))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "rollup.csv").open()))
    series = sorted({(r["run"], r["concurrency"]) for r in rows if r["valid"] in ("True", "true", "1")})
    assert series == [("dynamo stack", "1"), ("dynamo stack", "4"), ("sglang stack", "1"), ("sglang stack", "4")]
    for png in ("throughput_vs_tpot.png", "pareto.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _kill_and_rejoin(run, url: str, worker: str, component: str) -> tuple[set, set]:
    """SIGKILL a worker's engine; wait until the agent restarted it and the frontend lists the same number of
    instances of ``component`` again, one of them new. Returns the instance ids before and after."""
    before = _generate_ids(url, component)
    [pid] = _pids(run.run_dir)[worker]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ids = _generate_ids(url, component)
        if len(ids) == len(before) and ids != before and len(_pids(run.run_dir)[worker]) == 2:
            break
        time.sleep(0.5)
    return before, ids


def test_killed_worker_restarts_and_rejoins_the_frontend(agg):
    run, ep = agg["dynamo"]
    before, ids = _kill_and_rejoin(run, ep["url"], "workers-1", "backend")
    assert len(ids) == 2 and len(ids & before) == 1, (before, ids)   # one old instance, one new
    [st] = json.loads(_hpcserve("status", str(run.run_dir), "--json").stdout)
    by_id = {w["id"]: w for w in st["worker_list"]}
    assert by_id["workers-1"]["restarts"] == 1 and by_id["workers-1"]["state"] == "ready"
    _openai_both_ways(ep["url"])


def test_agg_cancel_leaves_nothing_running(agg):
    run, ep = agg["dynamo"]
    plan = json.loads((run.run_dir / "plan.json").read_text())
    ports = [port for p in plan["processes"] for port in p["ports"].values()]
    _assert_cancelled_clean(run, _pids(run.run_dir), ports + [w["port"] + 1 for w in plan["workers"]])


def test_pd_prefill_decode_with_kv_router(tmp_path):
    run = _submit(tmp_path, "dynamo-pd.yaml", "pd")
    try:
        ep = wait_ready(run, 120)
        plan = json.loads((run.run_dir / "plan.json").read_text())
        router = next(p for p in plan["processes"] if p["kind"] == "router")
        assert router["argv"][router["argv"].index("--router-mode") + 1] == "kv"
        assert len(_generate_ids(ep["url"], "prefill")) == 1 and len(_generate_ids(ep["url"], "backend")) == 1
        _openai_both_ways(ep["url"])
        [st] = json.loads(_hpcserve("status", str(run.run_dir), "--json").stdout)
        assert st["workers"] == {"decode": {"ready": 1}, "prefill": {"ready": 1}}
        # a killed prefill worker is restarted and registers again with the frontend under a new instance
        before, ids = _kill_and_rejoin(run, ep["url"], "prefill-0", "prefill")
        assert len(ids) == 1 and ids != before, (before, ids)
        [st] = json.loads(_hpcserve("status", str(run.run_dir), "--json").stdout)
        assert {w["id"]: (w["state"], w["restarts"]) for w in st["worker_list"]} == \
            {"prefill-0": ("ready", 1), "decode-0": ("ready", 0)}
        _openai_both_ways(ep["url"])
        ports = [port for p in plan["processes"] for port in p["ports"].values()]
        _assert_cancelled_clean(run, _pids(run.run_dir), ports)
    finally:
        cancel(run, wait=60)


def test_sweep_compares_stacks_in_one_allocation(tmp_path):
    """`sweep: {stack: [sglang, dynamo]}` with a benchmark stage: both stacks on the same shape, point after
    point in ONE job, each benchmarked with the API its endpoint serves, one report with both series."""
    base = free_port_block()
    recipe = tmp_path / "stacks.yaml"
    recipe.write_text(f"""\
name: stacks
model: {{path: {make_byte_model(tmp_path / "model")}, served_name: tiny}}
engine: {{kind: mock, mock: {{time-scale: 0.1}}}}
cluster: {REPO / "slurm/clusters/local.yaml"}
workers: {{replicas: 2, tp: 1}}
router: {{port: {base + 119}, policy: round_robin, dedicated_node: true}}
ports: {{base: {base}}}
timeouts: {{startup: 60}}
benchmark: {{isl: 64, osl: 16, concurrency: [1, 4], num_prompts: 8, warmup: 1}}
sweep: {{stack: [sglang, dynamo]}}
""")
    [run] = submit(recipe, run_dir=tmp_path / "run")
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            [st] = collect([str(run.run_dir)])
            if st.slurm_state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", None, "UNKNOWN"):
                break
            time.sleep(1)
        assert st.slurm_state == "COMPLETED", (st.slurm_state, st.phase)
    finally:
        cancel(run, wait=30)
    rows = list(csv.DictReader((run.run_dir / "report" / "rollup.csv").open()))
    assert sorted((r["run"], r["api"], r["concurrency"], r["valid"]) for r in rows) == [
        ("stacks[stack=dynamo]", "completions", "1", "true"), ("stacks[stack=dynamo]", "completions", "4", "true"),
        ("stacks[stack=sglang]", "generate", "1", "true"), ("stacks[stack=sglang]", "generate", "4", "true")]
    assert (run.run_dir / "report" / "throughput_vs_tpot.png").read_bytes()[:4] == b"\x89PNG"
