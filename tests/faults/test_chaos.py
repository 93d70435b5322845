"""Chaos tests against a real local deployment (node agents, redis-server, router, mock engines): kill or
stop one part while clients keep sending, and assert what the user sees. Faults of issue 8."""

from __future__ import annotations

import json
import os
import signal
import time

import chaos_util
import httpx
import pytest
from chaos_util import (
    GEN_BODY, Load, engine_pid, find_pids, healthy_by_port, one_pid, plan_workers, registry_view, router_workers,
    sse_read, total, write_recipe,
)
from proc_util import RedisProcess, demo_overrides, pids_alive, wait_for

from hpcserve.api import up


@pytest.fixture
def deploy(tmp_path):
    """deploy(recipe) -> (run, backend); every agent stopped at teardown, leftovers checked."""
    started = []

    def start(recipe):
        run, backend = up(recipe, demo_overrides(), run_dir=tmp_path / f"run{len(started)}")
        started.append(backend)
        return run, backend
    yield start
    for b in started:
        tree = find_pids([p.pid for p in b.procs], b"")
        b.stop()
        wait_for(lambda: pids_alive(tree) == [], 15, f"processes {tree} of the deployment gone after stop")


def ok_generate(url: str) -> bool:
    try:
        return httpx.post(url + "/generate", json=GEN_BODY, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def test_kill_decode_worker_under_load(deploy, tmp_path):
    # 20 ms per decode step: a 100-token stream lasts ~2 s, so it is surely in flight when its worker dies
    recipe = write_recipe(tmp_path, decode=2, mock={"time-scale": 1, "decode-step-ms": 20},
                          router_args=("--health-interval", "0.5"))
    run, backend = deploy(recipe)
    url = run.endpoint["url"]
    decodes = {w["id"]: w["port"] for w in plan_workers(run).values() if w["role"] == "decode"}
    stream_body = {"text": "stream me", "sampling_params": {"max_new_tokens": 100, "temperature": 0},
                   "stream": True}
    victim: dict = {}

    def kill_stream_worker():
        # the stream is the only request in flight now: its decode worker is the one with inflight 1
        busy = [w for w in httpx.get(url + "/workers", timeout=3).json()["workers"]
                if w["role"] == "decode" and w["inflight"] == 1]
        assert len(busy) == 1, busy
        port = int(busy[0]["url"].rsplit(":", 1)[1])
        victim["port"] = port
        # three clients: least_load then keeps both decode workers busy, the victim included
        with chaos_util.loads(url, 3, max_requests=400, max_seconds=20) as group:
            victim["loads"] = group
            wait_for(lambda: total(group) >= 15, 10, "load running before the kill")
            victim["before"] = total(group)
            victim["at_kill"] = [ld.count() for ld in group]
            os.kill(engine_pid(backend, port), signal.SIGKILL)
            # keep the load on until the agent has restarted the engine and the router uses it again
            wait_for(lambda: (w := (registry_view(run) or {}).get(wid_of(port))) and w.restarts == 1
                     and w.state == "ready", 20, "killed decode worker restarted and ready")
            n = total(group)
            wait_for(lambda: total(group) >= n + 30, 15, "30 more requests after the restart")

    def wid_of(port):
        return next(w for w, p in decodes.items() if p == port)

    payloads, ended = sse_read(url, "/generate", stream_body, on_first=kill_stream_worker, timeout=10)
    loads = victim["loads"]
    # the stream on the killed worker ended early, visibly: an SSE error event or a closed stream, no hang
    assert ended in ("error-event", "closed"), (ended, payloads[-2:])
    if ended == "error-event":
        assert wid_of(victim["port"]) in json.loads(payloads[-1])["error"]["message"]
    assert total(loads) > victim["before"] + 30
    # Every non-streaming request succeeded with the right text: connect failures were retried, and the
    # requests already on the killed worker were re-dispatched to the other one (nothing had reached the
    # client yet). The router counted those re-dispatches.
    assert [f for ld in loads for f in ld.failures()] == []
    assert set().union(*(ld.texts() for ld in loads)) == {expected_text(url)}
    assert redispatch_count(url, "decode", "worker_lost") >= 1
    assert ok_generate(url)


def expected_text(url: str) -> str:
    return httpx.post(url + "/generate", json=GEN_BODY, timeout=10).json()["text"]


def redispatch_count(url: str, role: str, reason: str) -> float:
    needle = f'hpcserve_router_redispatches_total{{reason="{reason}",role="{role}"}} '
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(needle):
            return float(line[len(needle):])
    return 0.0


def test_kill_prefill_worker_under_load(deploy, tmp_path):
    recipe = write_recipe(tmp_path, prefill=2, mock={"time-scale": 1, "decode-step-ms": 5})
    run, backend = deploy(recipe)
    url = run.endpoint["url"]
    prefills = {w["id"]: w["port"] for w in plan_workers(run).values() if w["role"] == "prefill"}
    victim_id, port = sorted(prefills.items())[0]
    with chaos_util.loads(url, 2, max_requests=300, max_seconds=20) as loads:
        wait_for(lambda: total(loads) >= 10, 10, "load running before the kill")
        at_kill = [ld.count() for ld in loads]
        os.kill(engine_pid(backend, port), signal.SIGKILL)
        wait_for(lambda: (w := (registry_view(run) or {}).get(victim_id)) and w.restarts == 1
                 and w.state == "ready", 20, "killed prefill worker restarted and ready")
        n = total(loads)
        wait_for(lambda: total(loads) >= n + 20, 15, "20 more requests after the restart")
    failures = [f for ld in loads for f in ld.failures()]
    assert len(failures) <= len(loads), failures
    for f in failures:
        assert f.status == 502 and victim_id in json.loads(f.detail)["error"]["message"], f
    for ld, k in zip(loads, at_kill):   # later requests all succeed (connect failures retried)
        assert all(o.status == 200 for o in ld.outcomes[k + 2:]), ld.failures()
    assert ok_generate(url)


HEALTH_INTERVAL = 0.5


def test_sigstop_worker_is_ejected_then_readmitted(deploy, tmp_path):
    # 5 ms decode steps: requests take ~40 ms, so some are on the worker when it stops
    recipe = write_recipe(tmp_path, decode=2, mock={"time-scale": 1, "decode-step-ms": 5},
                          router_args=("--health-interval", str(HEALTH_INTERVAL)))
    run, backend = deploy(recipe)
    url = run.endpoint["url"]
    port = plan_workers(run)["decode-0"]["port"]
    pid = engine_pid(backend, port)
    assert healthy_by_port(url, port) is True
    with chaos_util.loads(url, 2, max_requests=400, max_seconds=20) as loads:
        wait_for(lambda: total(loads) >= 10, 10, "load running before the stop")
        os.kill(pid, signal.SIGSTOP)
        try:
            # the wait is generous for a shared machine; the timing is asserted in probe rounds below
            wait_for(lambda: healthy_by_port(url, port) is False, 10, "stopped worker ejected")
            n = total(loads)
            wait_for(lambda: total(loads) >= n + 20, 10, "20 more requests while it is stopped")
            view = next(w for w in router_workers(url) if w["url"].endswith(f":{port}"))
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: healthy_by_port(url, port) is True, 10, "worker readmitted after SIGCONT")
    ej = view["last_ejection"]
    # ejected as stalled in the probe round of its first failed probe or the next one (2x the interval)
    assert ej["stalled"] is True and 0 <= ej["round"] - ej["first_failed_round"] <= 1, view
    # no request failed: those already on the stopped worker were moved to the other one when it was ejected
    assert [f for ld in loads for f in ld.failures()] == []
    assert set().union(*(ld.texts() for ld in loads)) == {expected_text(url)}
    assert pid in pids_alive([pid])       # the agent did not restart it: same process
    assert ok_generate(url)


def test_router_killed_is_restarted_and_rebuilds_view_from_redis(deploy, tmp_path):
    run, backend = deploy(write_recipe(tmp_path, decode=2))
    url = run.endpoint["url"]
    pid = one_pid(backend, b"hpcserve.router")
    assert ok_generate(url)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pids_alive([pid]) == [], 5, "router gone")
    # the agent starts a new router (budget 3); it learns every worker from the registry alone
    wait_for(lambda: ok_generate(url), 10, "requests succeed again through a new router")
    new_pid = one_pid(backend, b"hpcserve.router")
    assert new_pid != pid
    workers = wait_for(lambda: (ws := router_workers(url)) and len(ws) == 3 and ws, 5, "3 workers in the view")
    assert sorted((w["id"], w["role"], w["source"]) for w in workers) == [
        ("decode-0", "decode", "registry"), ("decode-1", "decode", "registry"), ("prefill-0", "prefill", "registry")]
    assert all(w["healthy"] for w in workers)
    assert all(ok_generate(url) for _ in range(10))
    assert [p.poll() for p in backend.procs] == [None, None, None]


def test_node_agent_killed_critical_group_ends_job(deploy, tmp_path):
    run, backend = deploy(write_recipe(tmp_path, decode=1, decode_critical=True))
    assert plan_workers(run)["decode-0"]["nodes"] == [1]      # the only decode worker lives on node 1
    agent = backend.procs[1]
    engines = find_pids([agent.pid], b"hpcserve.mock")
    assert len(engines) == 1
    agent.kill()
    agent.wait(5)
    # its engine dies with it (PR_SET_PDEATHSIG)
    wait_for(lambda: pids_alive(engines) == [], 5, "decode engine ended with its agent")
    # the registry reports it dead once its heartbeat (TTL 5 s) expired
    wait_for(lambda: (v := registry_view(run)) is not None and v["decode-0"].state == "dead", 10,
             "decode-0 marked dead in the registry")
    # the decode group is critical: the head agent ends the job and says why
    failure = wait_for(lambda: (run.run_dir / "failure.json").exists()
                       and json.loads((run.run_dir / "failure.json").read_text()), 10, "failure.json written")
    assert "critical group" in failure["message"] and "decode-0" in failure["message"], failure
    assert backend.procs[0].wait(30) == 1


def test_run_redis_killed_agent_restarts_it_workers_reregister(deploy, tmp_path):
    run, backend = deploy(write_recipe(tmp_path, decode=1))
    url = run.endpoint["url"]
    # redis-server retitles itself "redis-server 127.0.0.1:PORT": find it by that, under the head agent
    rport = json.loads((run.run_dir / "redis.json").read_text())["port"]
    old = one_pid(backend, b"redis-server", f":{rport}".encode())
    # killed right away: the router may know the workers from pub/sub alone (no full rescan yet)
    with Load(url, max_requests=3000, max_seconds=25) as load:
        wait_for(lambda: load.count() >= 5, 10, "load running")
        at_kill = load.count()
        os.kill(old, signal.SIGKILL)
        # the head agent starts it again from the same redis.conf (same port and password), empty
        new = wait_for(lambda: (p := find_pids([backend.procs[0].pid], b"redis-server")) and p != [old] and p,
                       10, "redis-server started again")
        assert len(new) == 1 and new[0] != old
        wait_for(lambda: (v := registry_view(run)) and {w for w, r in v.items() if r.state == "ready"}
                 == {"prefill-0", "decode-0"}, 5, "both workers re-registered within 5 s")
        n = load.count()
        wait_for(lambda: load.count() >= n + 20, 10, "router serving after Redis came back")
    assert load.count() - at_kill >= 20
    assert load.failures() == []          # the router served throughout
    assert not (run.run_dir / "failure.json").exists()
    assert [p.poll() for p in backend.procs] == [None, None]
    assert {w["id"] for w in router_workers(url) if w["healthy"]} == {"prefill-0", "decode-0"}


def test_external_redis_killed_and_restarted_workers_reregister(deploy, tmp_path):
    # An external Redis (recipe redis.url) is not the agent's to restart: the test restarts it.
    # One aggregated worker on one node keeps the test small (other nodes find an external Redis too).
    ext = RedisProcess(tmp_path).start()
    try:
        run, backend = deploy(write_recipe(tmp_path, aggregated=1, redis_url=ext.url))
        url = run.endpoint["url"]
        assert registry_view(run, ext.url)["workers-0"].state == "ready"
        with Load(url, max_requests=3000, max_seconds=25) as load:
            wait_for(lambda: load.count() >= 5, 10, "load running")
            at_kill = load.count()
            ext.kill()
            assert registry_view(run, ext.url) is None
            # answered while Redis is down, over more than one registry rescan interval (2 s)
            wait_for(lambda: load.count() >= at_kill + 20, 10, "20 requests answered while Redis is down")
            time.sleep(2.5)          # Redis stays down longer than one registry rescan interval (2 s)
            at_restart = load.count()
            ext.start()              # same port and config, empty data
            wait_for(lambda: (v := registry_view(run, ext.url)) and v.get("workers-0")
                     and v["workers-0"].state == "ready", 5, "worker re-registered within 5 s")
            wait_for(lambda: healthy_by_port(url, plan_workers(run)["workers-0"]["port"]), 5, "router has it")
            at_back = load.count()
            wait_for(lambda: load.count() >= at_back + 20, 10, "router serving after Redis came back")
        assert at_restart - at_kill >= 20     # requests answered while Redis was down
        # the router kept the worker while the restarted, empty Redis did not list it yet
        assert load.failures() == []
        assert [p.poll() for p in backend.procs] == [None]
    finally:
        ext.kill()


def test_node_agent_killed_noncritical_workers_dead_job_serves(deploy, tmp_path):
    run, backend = deploy(write_recipe(tmp_path, decode=2))
    url = run.endpoint["url"]
    workers = plan_workers(run)
    gone = next(w for w in workers.values() if w["role"] == "decode" and w["nodes"] != [0])
    agent = backend.procs[gone["nodes"][0]]
    engines = find_pids([agent.pid], b"hpcserve.mock")
    agent.kill()
    agent.wait(5)
    wait_for(lambda: pids_alive(engines) == [], 5, "engine ended with its agent")
    wait_for(lambda: (v := registry_view(run)) is not None and v[gone["id"]].state == "dead", 10,
             f"{gone['id']} marked dead in the registry")
    # the router stops using it (registry: dead, or its own probes) and the rest keeps serving
    wait_for(lambda: healthy_by_port(url, gone["port"]) in (None, False), 10, "router no longer uses it")
    assert all(ok_generate(url) for _ in range(10))
    others = {w for w, r in registry_view(run).items() if r.state == "ready"}
    assert others == set(workers) - {gone["id"]}
    assert not (run.run_dir / "failure.json").exists()
    assert [p.poll() for i, p in enumerate(backend.procs) if i != gone["nodes"][0]] == [None, None]
