"""Secrets and listening addresses on a real local deployment: the per-run Redis password and the router's API
key appear in no log, rendered file, command line or CLI output; servers listen on the node's address unless
the recipe asks for every interface."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import httpx
import pytest
from proc_util import REPO, descendants

from hpcserve.errors import RecipeError
from hpcserve.recipe.load import load_recipe

DEMO = REPO / "recipes/local-demo.yaml"
API_KEY = "sk-test-7f3a9c1e55d04b2f"


def _listening(ports: set[int]) -> dict[int, str]:
    """port -> local address of LISTEN sockets on those ports, from /proc/net/tcp (what the kernel says)."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, state = line.split()[1], line.split()[3]
            hexaddr, hexport = local.split(":")
            port = int(hexport, 16)
            if state == "0A" and port in ports:   # 0A = TCP_LISTEN
                out[port] = ".".join(str(b) for b in reversed(bytes.fromhex(hexaddr)))
    return out


def _server_ports(run) -> set[int]:
    plan = json.loads((run.run_dir / "plan.json").read_text())
    return {port for p in plan["processes"] for port in p["ports"].values()} | {plan["router_port"]}


def _hpcserve(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_secrets_never_leave_their_0600_files(deployment, tmp_path, monkeypatch):
    monkeypatch.setenv("HPCSERVE_TEST_API_KEY", API_KEY)
    run, backend = deployment(extra=["router.api_key_env=HPCSERVE_TEST_API_KEY"])
    url = run.endpoint["url"]
    redis_info = json.loads((run.run_dir / "redis.json").read_text())
    password = redis_info["password"]
    assert len(password) >= 24
    body = {"text": "secret?", "sampling_params": {"max_new_tokens": 4}}
    assert httpx.post(url + "/generate", json=body, timeout=10).status_code == 401
    assert httpx.post(url + "/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=10).status_code == 200
    assert httpx.post(url + "/generate", json=body, headers={"Authorization": "Bearer wrong"},
                      timeout=10).status_code == 401
    # argv of every process of the deployment is readable by any user on the node: no secret in it
    pids = [p.pid for p in backend.procs]
    for pid in pids + [d for p in pids for d in descendants(p)]:
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        assert password.encode() not in cmdline and API_KEY.encode() not in cmdline, cmdline
    outputs = [_hpcserve("status", str(run.run_dir), "--json"), _hpcserve("logs", str(run.run_dir)),
               _hpcserve("render", str(DEMO), "-o", str(tmp_path / "rendered")),
               _hpcserve("validate", str(DEMO))]
    assert outputs[0].returncode == 0 and json.loads(outputs[0].stdout)[0]["phase"] == "ready"
    backend.stop()
    secret_files = {"redis.json", "redis.conf"}
    for name in secret_files:
        assert stat.S_IMODE(os.stat(run.run_dir / name).st_mode) == 0o600, name
    assert f"requirepass {password}" in (run.run_dir / "redis.conf").read_text()
    checked = 0
    for root in (run.run_dir, tmp_path / "rendered"):
        for path in root.rglob("*"):
            if path.is_file() and path.name not in secret_files:
                data = path.read_bytes()
                assert password.encode() not in data, f"Redis password in {path}"
                assert API_KEY.encode() not in data, f"API key in {path}"
                checked += 1
    assert checked >= 10          # logs of every process, plan, job script, endpoint, hosts...
    for res in outputs:
        assert password not in res.stdout + res.stderr and API_KEY not in res.stdout + res.stderr


def test_external_redis_password_comes_from_an_env_var_only(tmp_path):
    with pytest.raises(RecipeError, match="do not put the password in redis.url.*redis.password_env"):
        load_recipe(DEMO, ["redis.url=redis://:hunter2@10.0.0.5:6379/0"])
    [lr] = load_recipe(DEMO, ["redis.url=redis://10.0.0.5:6379/0", "redis.password_env=MY_REDIS_PASSWORD"])
    assert lr.recipe.redis.password_env == "MY_REDIS_PASSWORD"


def test_servers_listen_on_the_node_address_unless_asked(deployment):
    run, _ = deployment()
    ports = _server_ports(run)
    got = _listening(ports)
    assert got == {p: "127.0.0.1" for p in ports}, got      # redis, router, engines and bootstrap servers
    run2, _ = deployment(extra=["serve.bind=all"])
    ports2 = _server_ports(run2)
    got2 = _listening(ports2)
    assert got2 == {p: "0.0.0.0" for p in ports2}, got2
    # clients still reach it on the node's address
    assert httpx.get(run2.endpoint["url"] + "/health", timeout=10).status_code == 200
