"""The control API against real `hpcserve up` deployments (mock engines, real Redis, router and agents): every
route answers with the registry's truth; drain under load loses no request; restart rejoins; a policy switch
changes where new requests go; bad requests get a 4xx with a one-line reason."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import redis.asyncio as aioredis
from control_util import KEY, Load, start
from proc_util import wait_for

from hpcserve import registry


def _registry(d) -> tuple[dict, list]:
    async def go():
        client = aioredis.from_url(d.redis_url, socket_timeout=5)
        try:
            return (await registry.load_workers(client, d.run_id),
                    await client.xrange(registry.events_key(d.run_id)))
        finally:
            await client.aclose()
    return asyncio.run(go())


def _hpcserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_routes_answer_with_the_registry_truth_and_refuse_bad_requests(deployment, tmp_path, monkeypatch):
    d, _ = start(deployment, tmp_path, monkeypatch)
    assert httpx.get(d.control + "/health", timeout=10).json() == {"status": "ok"}
    # the run
    run = d.get("/v1/run").json()
    plan = json.loads((d.run_dir / "plan.json").read_text())
    assert (run["name"], run["mode"], run["phase"], run["nodes"]) == ("control-demo", "pd", "ready", plan["num_nodes"])
    assert run["endpoint"] == d.router and run["run_id"] == d.run_id and run["control"] == d.control
    assert {g["group"]: g["workers"] for g in run["groups"]} == {"prefill": ["prefill-0"],
                                                                  "decode": ["decode-0", "decode-1"]}
    # workers: each field of the registry record as Redis holds it, plus the router's in-flight count
    recs, events = _registry(d)
    workers = d.get("/v1/workers").json()
    assert [w["id"] for w in workers] == sorted(recs) == ["decode-0", "decode-1", "prefill-0"]
    for w in workers:
        assert {k: w[k] for k in recs[w["id"]].model_dump()} == recs[w["id"]].model_dump()
        assert w["state"] == "ready" and w["rotation"] is True and w["healthy"] is True
        assert w["inflight"] == d.worker_value("hpcserve_router_worker_inflight", w["id"]) == 0
    assert d.get("/v1/workers/decode-1").json() == next(w for w in workers if w["id"] == "decode-1")
    # events: the stream as Redis holds it, oldest first
    got = d.get("/v1/events", params={"count": 1000}).json()["events"]
    assert [(e["id"], e["kind"]) for e in got[:len(events)]] == [(i.decode(), b[b"kind"].decode()) for i, b in events]
    assert {e["fields"].get("worker") for e in got if e["kind"] == "ready"} >= {"prefill-0", "decode-0", "decode-1"}
    # OpenAPI
    assert httpx.get(d.control + "/docs", timeout=10).status_code == 200
    paths = httpx.get(d.control + "/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/run", "/v1/workers", "/v1/workers/{worker_id}/drain", "/v1/groups/{group}/policy"} <= set(paths)
    # refusals: status and a one-line reason naming the fix
    bad = [
        (httpx.get(d.control + "/v1/workers", timeout=10), 401, "Authorization: Bearer"),
        (httpx.get(d.control + "/v1/run", headers={"Authorization": "Bearer wrong"}, timeout=10), 401, "API key"),
        (d.send("POST", "/v1/workers/nope-7/drain"), 404, "unknown worker 'nope-7'; workers: decode-0"),
        (d.send("POST", "/v1/workers/nope-7/restart"), 404, "unknown worker 'nope-7'"),
        (d.send("PUT", "/v1/groups/decode/policy", json={"policy": "fastest"}), 422, "policy: Input should be"),
        (d.send("PUT", "/v1/groups/nope/policy", json={"policy": "random"}), 404, "unknown group 'nope'; groups: "),
        (d.send("PUT", "/v1/workers/decode-0/rotation", json={}), 422, "rotation: Field required"),
        (d.send("POST", "/v1/workers/decode-0/drain", params={"timeout": -1}), 422, "timeout:"),
        (d.send("POST", "/v1/workers/prefill-0/drain"), 409,
         "prefill-0 is the last prefill worker in rotation: new requests would be refused (503); pass force=true"),
        (d.send("PUT", "/v1/workers/prefill-0/rotation", json={"rotation": False}), 409, "last prefill worker"),
    ]
    for r, status, words in bad:
        detail = r.json()["detail"]
        assert r.status_code == status and words in detail and "\n" not in detail, (r.status_code, detail)
    # a key was checked before anything else: no action was recorded for the refused calls
    assert not [e for e in d.get("/v1/events", params={"count": 1000}).json()["events"] if e["kind"] == "action"]


def test_events_follow_mode_streams_actions_as_they_happen(deployment, tmp_path, monkeypatch):
    d, _ = start(deployment, tmp_path, monkeypatch)
    seen: list[dict] = []
    with httpx.stream("GET", d.control + "/v1/events", params={"follow": "true", "count": 2}, headers=d.headers,
                      timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        acted = False
        for line in lines:
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
            if len(seen) == 2 and not acted:   # the backlog is in: act, and the action must arrive
                out = d.send("PUT", "/v1/workers/decode-1/rotation", json={"rotation": False}).json()
                assert out["ok"] is True, out
                acted = True
            if seen and seen[-1]["kind"] == "action":
                break
    action = seen[-1]
    assert action["fields"] == {"action": "rotate_out", "target": "decode-1", "ok": "True",
                                "message": "decode-1 out of rotation"}
    assert d.get("/v1/workers/decode-1").json()["rotation"] is False
    assert d.worker_value("hpcserve_router_worker_in_rotation", "decode-1") == 0


def test_drain_under_load_loses_nothing_and_restart_rejoins(deployment, tmp_path, monkeypatch):
    # 20 ms per decode step, 12 tokens: each request is in flight for a quarter of a second
    d, _ = start(deployment, tmp_path, monkeypatch, mock={"time-scale": 1, "decode-step-ms": 20})
    with Load(d.router, clients=6) as load:
        wait_for(lambda: load.count() >= 12 and d.worker_value("hpcserve_router_worker_inflight", "decode-0"),
              60, "load reaching decode-0")
        out = _hpcserve("drain", "decode-0", "--run", str(d.run_dir), "--json")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["ok"] is True and result["worker"]["state"] == "draining", result
        assert result["worker"]["inflight"] == 0 and result["worker"]["rotation"] is False
        sent = d.worker_value("hpcserve_router_worker_requests_total", "decode-0")
        before = load.count()
        wait_for(lambda: load.count() >= before + 12, 60, "12 more requests after the drain")
        # nothing new went to the drained worker
        assert d.worker_value("hpcserve_router_worker_requests_total", "decode-0") == sent
        assert d.worker_value("hpcserve_router_worker_in_rotation", "decode-0") == 0
    assert load.results and all(r == (200, True) for r in load.results), \
        [r for r in load.results if r != (200, True)][:5]
    recs, events = _registry(d)
    assert recs["decode-0"].state == "draining" and recs["decode-0"].rotation is False
    drained = [b for _, b in events if b[b"kind"] == b"action" and b[b"action"] == b"drain"]
    assert drained and drained[-1][b"target"] == b"decode-0" and drained[-1][b"ok"] == b"True"
    # restart: a new engine process, ready, back in rotation, and serving again
    pid_file_before = recs["decode-0"].started_at
    out = _hpcserve("restart", "decode-0", "--run", str(d.run_dir))
    assert out.returncode == 0 and out.stdout.startswith("ok decode-0 restarted (restart 1)"), (out.stdout, out.stderr)
    recs, events = _registry(d)
    assert (recs["decode-0"].state, recs["decode-0"].restarts, recs["decode-0"].rotation) == ("ready", 1, True)
    assert recs["decode-0"].started_at > pid_file_before
    assert any(b[b"kind"] == b"restart" and b.get(b"by") == b"operator" for _, b in events)
    sent = d.worker_value("hpcserve_router_worker_requests_total", "decode-0") or 0
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        for i in range(6):
            r = c.post(d.router + "/v1/completions", json={"model": "demo", "prompt": f"again {i}", "max_tokens": 2})
            assert r.status_code == 200, r.text
    assert d.worker_value("hpcserve_router_worker_requests_total", "decode-0") > sent


def _decode_counts(d) -> dict[str, float]:
    return {w: d.worker_value("hpcserve_router_worker_requests_total", w) or 0 for w in ("decode-0", "decode-1")}


def _send_same_prompt(d, n: int) -> dict[str, float]:
    before = _decode_counts(d)
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        for _ in range(n):
            r = c.post(d.router + "/generate", json={"text": "the same prompt every time",
                                                    "sampling_params": {"max_new_tokens": 2}})
            assert r.status_code == 200, r.text
    after = _decode_counts(d)
    return {w: after[w] - before[w] for w in after}


def test_policy_switch_takes_effect_for_new_requests(deployment, tmp_path, monkeypatch):
    d, _ = start(deployment, tmp_path, monkeypatch)
    r = d.send("PUT", "/v1/groups/decode/policy", json={"policy": "round_robin"}).json()
    assert r["ok"] is True and r["group"]["policy"] == r["group"]["chosen_policy"] == "round_robin", r
    assert _send_same_prompt(d, 8) == {"decode-0": 4, "decode-1": 4}   # alternating
    r = d.send("PUT", "/v1/groups/decode/policy", json={"policy": "cache_aware"}).json()
    assert r["ok"] is True and r["message"] == "decode routes with cache_aware now", r
    counts = _send_same_prompt(d, 8)
    assert sorted(counts.values()) == [0, 8], counts                  # one worker holds the prefix
    groups = {g["group"]: g for g in d.get("/v1/groups").json()}
    assert groups["decode"]["policy"] == "cache_aware" and groups["prefill"]["chosen_policy"] is None
    _, events = _registry(d)
    assert [b[b"message"].decode() for _, b in events if b[b"kind"] == b"action"] == [
        "decode routes with round_robin now", "decode routes with cache_aware now"]


def test_status_asks_the_control_api_and_falls_back_to_redis(deployment, tmp_path, monkeypatch):
    d, _ = start(deployment, tmp_path, monkeypatch)
    out = _hpcserve("status", str(d.run_dir), "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    [st] = json.loads(out.stdout)
    assert (st["source"], st["phase"]) == ("control", "ready")
    assert st["worker_list"] == d.get("/v1/workers").json()
    assert st["workers"] == {"decode": {"ready": 2}, "prefill": {"ready": 1}}
    # without the key here the control API refuses: status falls back to Redis with the same workers
    env = {k: v for k, v in os.environ.items() if k != "HPCSERVE_TEST_CONTROL_KEY"}
    out = subprocess.run([sys.executable, "-m", "hpcserve", "status", str(d.run_dir), "--json"], capture_output=True,
                         text=True, timeout=60, env=env)
    [st] = json.loads(out.stdout)
    assert (st["source"], st["phase"]) == ("redis", "ready")
    assert [w["id"] for w in st["worker_list"]] == ["decode-0", "decode-1", "prefill-0"]


def test_kv_usage_and_cached_token_ratio_come_from_the_engine_metrics(deployment, tmp_path, monkeypatch):
    """A worker whose engine exports SGLang's KV gauges (served by a small real HTTP server here) shows them in
    /v1/workers; the demo's mock models no KV cache, so it exports none (the mock with a KV cache does:
    tests/engines/test_kv_cache.py). The extra worker's role (both) is not routed in PD mode."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Engine(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (b'# TYPE sglang:token_usage gauge\nsglang:token_usage{model_name="demo"} 0.42\n'
                    b'# TYPE sglang:cache_hit_rate gauge\nsglang:cache_hit_rate{model_name="demo"} 0.3\n')
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    d, _ = start(deployment, tmp_path, monkeypatch)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rec = registry.WorkerRecord(id="extra-0", role="both", group="workers", node=0, host="127.0.0.1",
                                    url=f"http://127.0.0.1:{server.server_port}", state="ready")

        async def register():
            client = aioredis.from_url(d.redis_url, socket_timeout=5)
            try:
                await registry.publish_worker(client, d.run_id, rec, hb_ttl=60)
            finally:
                await client.aclose()
        asyncio.run(register())
        w = d.get("/v1/workers/extra-0").json()
        assert (w["kv_usage"], w["cached_token_ratio"], w["state"]) == (0.42, 0.3, "ready")
        assert w["inflight"] is None          # the router does not route it, so it reports nothing for it
        mock = d.get("/v1/workers/decode-0").json()
        assert (mock["kv_usage"], mock["cached_token_ratio"]) == (None, None)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_after_a_redis_restart_the_rotation_flag_survives_and_actions_work_again(deployment, tmp_path, monkeypatch):
    import signal

    from chaos_util import find_pids, one_pid
    d, backend = start(deployment, tmp_path, monkeypatch)
    assert d.send("PUT", "/v1/workers/decode-1/rotation", json={"rotation": False}).json()["ok"] is True
    rport = json.loads((d.run_dir / "redis.json").read_text())["port"]
    old = one_pid(backend, b"redis-server", f":{rport}".encode())
    os.kill(old, signal.SIGKILL)   # the head agent starts it again, empty, from the same redis.conf
    wait_for(lambda: (p := find_pids([backend.procs[0].pid], b"redis-server")) and p != [old], 15,
          "redis-server started again")
    # the agents re-register their workers with what they hold, rotation included
    wait_for(lambda: {w: r.rotation for w, r in _registry(d)[0].items() if r.state == "ready"}
          == {"prefill-0": True, "decode-0": True, "decode-1": False}, 15, "workers re-registered")
    workers = {w["id"]: w for w in d.get("/v1/workers").json()}
    assert workers["decode-1"]["rotation"] is False
    wait_for(lambda: d.worker_value("hpcserve_router_worker_in_rotation", "decode-1") == 0, 10,
          "the router still keeps decode-1 out")
    # the agents listen for commands again: an action round-trips through the new Redis
    out = wait_for(lambda: (r := d.send("PUT", "/v1/workers/decode-1/rotation", json={"rotation": True})).status_code
                == 200 and r.json(), 15, "rotation back in accepted")
    assert out["ok"] is True and out["worker"]["rotation"] is True, out
    assert d.worker_value("hpcserve_router_worker_in_rotation", "decode-1") == 1
