"""`hpcserve up` against real processes: agents, redis-server, mock engines, router, over real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from proc_util import REPO, demo_overrides, descendants, pids_alive, wait_for

from hpcserve import registry
from hpcserve.mock.model import SamplingParams, complete
from hpcserve.engine_shell.tokenizer import Prompt

DEMO = REPO / "recipes/local-demo.yaml"
PROMPT = "The quick brown fox"
SP = {"max_new_tokens": 12, "temperature": 0}


def expected_text(prompt: str = PROMPT, sp: dict = SP) -> str:
    return complete(Prompt.from_text(prompt), SamplingParams.from_dict(sp, 16)).text


def _agg_recipe(tmp_path, replicas=1, restart=2):
    p = tmp_path / "agg.yaml"
    p.write_text(f"""\
name: agg-demo
model: {{path: demo/tiny, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 0}}}}
cluster: {{backend: local, gpus_per_node: 0, address: 127.0.0.1}}
workers: {{replicas: {replicas}, restart: {restart}}}
""")
    return p


def _sse_text(url: str, body: dict) -> tuple[str, list[str]]:
    chunks = []
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return chunks


@pytest.mark.parametrize("mode", ["pd", "aggregated"])
def test_up_serves_deterministic_text_stream_and_not(deployment, tmp_path, mode):
    run, _ = deployment(DEMO if mode == "pd" else _agg_recipe(tmp_path))
    url = run.endpoint["url"]
    r = httpx.post(url + "/generate", json={"text": PROMPT, "sampling_params": SP}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == expected_text()
    chunks = _sse_text(url + "/generate", {"text": PROMPT, "sampling_params": SP, "stream": True})
    assert json.loads(chunks[-2])["text"] == expected_text()      # cumulative text, like SGLang
    c = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": PROMPT, "max_tokens": 12,
                                                 "temperature": 0}, timeout=30)
    assert c.status_code == 200 and c.json()["choices"][0]["text"] == expected_text()
    chunks = _sse_text(url + "/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": 12,
                                                 "temperature": 0, "stream": True})
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]) == expected_text()


def test_openai_client_through_up(deployment):
    openai = pytest.importorskip("openai")
    run, _ = deployment()
    client = openai.OpenAI(base_url=run.endpoint["url"] + "/v1", api_key="unused", timeout=30)
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected_text()
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          stream=True)
    assert len("".join(ch.choices[0].delta.content or "" for ch in chat if ch.choices)) > 0


def test_registry_lists_workers_with_role_node_state(deployment):
    run, _ = deployment()
    url = json.loads((run.run_dir / "redis.json").read_text())["url"]
    assert oct((run.run_dir / "redis.json").stat().st_mode & 0o777) == "0o600"
    r = redis.Redis.from_url(url)
    recs = {k.decode(): registry.WorkerRecord.from_json(v) for k, v in r.hgetall(registry.workers_key(run.run_dir.name)).items()}
    r.close()
    assert {(w.id, w.role, w.node, w.state) for w in recs.values()} == {("prefill-0", "prefill", 0, "ready"),
                                                                        ("decode-0", "decode", 1, "ready")}
    assert recs["prefill-0"].bootstrap_port is not None and recs["decode-0"].bootstrap_port is None


def _worker(run, wid):
    url = json.loads((run.run_dir / "redis.json").read_text())["url"]
    r = redis.Redis.from_url(url)
    try:
        raw = r.hget(registry.workers_key(run.run_dir.name), wid)
        return registry.WorkerRecord.from_json(raw) if raw else None
    finally:
        r.close()


def _engine_pid(run, port: int) -> int:
    for pid in descendants(os.getpid()):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"hpcserve.mock" in cmd and str(port).encode() in cmd:
            return pid
    raise AssertionError(f"no engine on port {port}")


def test_killed_worker_restarts_then_exhausted_is_dead_and_router_avoids_it(deployment, tmp_path):
    run, _ = deployment(_agg_recipe(tmp_path, replicas=2, restart=1))
    plan = json.loads((run.run_dir / "plan.json").read_text())
    port0 = next(w["port"] for w in plan["workers"] if w["id"] == "workers-0")
    os.kill(_engine_pid(run, port0), signal.SIGKILL)
    rec = wait_for(lambda: (w := _worker(run, "workers-0")) and w.restarts == 1 and w.state == "ready" and w, 30,
                   "workers-0 restarted once and ready")
    assert rec.restarts == 1
    os.kill(_engine_pid(run, port0), signal.SIGKILL)     # budget of 1 restart is spent now
    wait_for(lambda: (w := _worker(run, "workers-0")) and w.state == "dead", 30, "workers-0 dead")
    url = run.endpoint["url"]
    wait_for(lambda: not any(w["healthy"] and str(port0) in w["url"]
                             for w in httpx.get(url + "/workers", timeout=5).json()["workers"]), 30,
             "the router no longer counts workers-0 healthy")
    for _ in range(6):
        r = httpx.post(url + "/generate", json={"text": PROMPT, "sampling_params": SP}, timeout=30)
        assert r.status_code == 200 and r.json()["text"] == expected_text()
    other = next(w["port"] for w in plan["workers"] if w["id"] == "workers-1")
    stats = httpx.get(f"http://127.0.0.1:{other}/mock/stats", timeout=5).json()
    assert json.dumps(stats).count("generate") >= 1


def _up_in_subprocess(recipe: Path, tmp_path: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    """`hpcserve up` as a user runs it: the process and its `endpoint ...` line, read within 90 s."""
    proc = subprocess.Popen([sys.executable, "-m", "hpcserve", "up", str(recipe), "--run-dir", str(tmp_path / "run"),
                             *sum((["--set", o] for o in overrides), [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    deadline = time.monotonic() + 90
    while "endpoint" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
    if "endpoint" not in line:
        proc.kill()
        raise AssertionError("no endpoint line within 90 s")
    return proc, line


def test_sigint_on_up_leaves_no_process(tmp_path):
    proc, _ = _up_in_subprocess(DEMO, tmp_path, demo_overrides())
    try:
        tree = descendants(proc.pid)
        assert len(tree) >= 5      # 2 agents, redis, router, 2 engines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: pids_alive(tree) == [], 15, "no process of the tree left")


def test_status_and_logs_of_a_local_run(deployment):
    run, _ = deployment()
    res = subprocess.run([sys.executable, "-m", "hpcserve", "status", str(run.run_dir), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    [st] = json.loads(res.stdout)
    assert st["phase"] == "ready" and st["backend"] == "local" and st["endpoint"] == run.endpoint["url"]
    assert st["workers"] == {"decode": {"ready": 1}, "prefill": {"ready": 1}}
    res = subprocess.run([sys.executable, "-m", "hpcserve", "logs", str(run.run_dir), "--role", "decode"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert "==> decode-0" in res.stdout and "decode server" in res.stdout and "prefill-0" not in res.stdout


def test_redis_killed_is_restarted_workers_reregister_router_keeps_serving(deployment):
    run, _ = deployment()
    url = run.endpoint["url"]
    port = json.loads((run.run_dir / "redis.json").read_text())["port"]
    redis_pid = next(p for p in descendants(os.getpid())      # redis-server retitles itself "redis-server ADDR:PORT"
                     if f"redis-server 127.0.0.1:{port}".encode() in open(f"/proc/{p}/cmdline", "rb").read())
    os.kill(redis_pid, signal.SIGKILL)
    t0 = time.monotonic()
    served = 0
    while time.monotonic() - t0 < 3:      # the router serves from its last view meanwhile
        r = httpx.post(url + "/generate", json={"text": PROMPT, "sampling_params": SP}, timeout=10)
        assert r.status_code == 200 and r.json()["text"] == expected_text()
        served += 1
    assert served > 0
    recs = wait_for(lambda: (a := _worker(run, "prefill-0")) and (b := _worker(run, "decode-0")) and (a, b), 5,
                    "both workers registered")
    assert {recs[0].state, recs[1].state} == {"ready"}
    assert "restart 1" in (run.run_dir / "logs/agent-node0.log").read_text()


def test_sigint_on_up_drains_open_streams(tmp_path):
    """Ctrl-C while a stream is open: the stream ends complete ([DONE], every token, no error event) within
    timeouts.drain, then everything stops."""
    recipe = tmp_path / "slow.yaml"
    recipe.write_text(DEMO.read_text().replace("mock: {time-scale: 0}", "mock: {time-scale: 1, decode-step-ms: 100}"))
    proc, line = _up_in_subprocess(recipe, tmp_path, demo_overrides(["timeouts.drain=20"]))
    try:
        url = line.split()[1]
        tree = descendants(proc.pid)
        sp = {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True}
        events = []
        with httpx.stream("POST", url + "/generate", json={"text": PROMPT, "sampling_params": sp, "stream": True},
                          timeout=60) as r:
            for ev in r.iter_lines():
                if ev.startswith("data: "):
                    events.append(ev[6:])
                    if len(events) == 2:
                        proc.send_signal(signal.SIGINT)   # mid-stream: about 2.8 s of decoding left
        assert events[-1] == "[DONE]" and not any("error" in e for e in events), events[-3:]
        assert json.loads(events[-2])["meta_info"]["completion_tokens"] == 30
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: pids_alive(tree) == [], 15, "no process of the tree left")


def test_readiness_progress_names_workers_per_role(tmp_path):
    """What `up` and `submit --wait` show while they wait: a live line on a terminal at once, plain lines every
    `every` seconds otherwise (none for a quick start)."""
    import io

    from hpcserve.api import prepare_run
    from hpcserve.cli.progress import ReadinessProgress
    [(d, _)] = prepare_run(DEMO, demo_overrides(), run_dir=tmp_path / "run")
    tty, plain, quiet = io.StringIO(), io.StringIO(), io.StringIO()
    for stream, is_tty, every in ((tty, True, 10.0), (plain, False, 0.0), (quiet, False, 10.0)):
        p = ReadinessProgress(stream=stream, tty=is_tty, every=every)
        p.tick(d)
        p.close()
    want = "waiting: starting; workers decode 0/1 ready, prefill 0/1 ready"
    assert tty.getvalue().startswith("\r\x1b[2K" + want) and tty.getvalue().endswith("\n")
    assert plain.getvalue().splitlines()[0] == want
    assert quiet.getvalue() == ""
