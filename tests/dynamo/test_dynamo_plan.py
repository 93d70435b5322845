"""The Dynamo stack without a cluster: what the plan runs (frontend, mocker or dynamo.sglang workers, Dynamo's
wiring through the environment), user mistakes as one line with exit 2, Dynamo's own parser in
--engine-check, and the frontend readiness rule against a small real HTTP server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from hpcserve.api import load_plans
from hpcserve.engines.check import check_plan_engine_args
from hpcserve.errors import HpcserveError
from hpcserve.stacks.base import get_stack
from hpcserve.stacks.dynamo import count_instances
from proc_util import REPO

AGG, PD = REPO / "recipes/dynamo-agg.yaml", REPO / "recipes/dynamo-pd.yaml"


def _plan(recipe, *overrides):
    [(_, p)] = load_plans(recipe, list(overrides), python="python3")
    return p


def _validate(*args):
    return subprocess.run([sys.executable, "-m", "hpcserve", "validate", *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_agg_plan_runs_frontend_and_mockers_wired_by_file_discovery():
    p = _plan(AGG)
    assert (p.stack, p.engine) == ("dynamo", "dynamo-mocker")
    assert [pr.kind for pr in p.processes] == ["redis", "router", "engine", "engine"]   # no control API
    head = p.processes[1]
    assert head.argv == ["python3", "-m", "dynamo.frontend", "--http-host", "{addr}", "--http-port", "8000",
                         "--router-mode", "round-robin"]
    assert head.env["DYN_FILE_KV"] == "{run_dir}/dynamo/{epoch}" and head.env["DYN_DISCOVERY_BACKEND"] == "file"
    w0, w1 = p.processes[2:]
    assert w0.argv == ["python3", "-m", "dynamo.mocker", "--model-path", "/lustre/models/tiny-byte-model",
                       "--model-name", "tiny", "--speedup-ratio", "10.0"]
    for w, spec in ((w0, p.workers[0]), (w1, p.workers[1])):
        assert w.env["DYN_SYSTEM_PORT"] == str(w.ports["http"]) == str(spec.port)
        assert w.env["DYN_TCP_RPC_PORT"] == str(spec.port + 1)
        assert (w.env["DYN_REQUEST_PLANE"], w.env["DYN_EVENT_PLANE"]) == ("tcp", "zmq")
    assert (w0.env["CUDA_VISIBLE_DEVICES"], w1.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")   # same GPU packing


def test_pd_plan_prefill_decode_mockers_and_kv_router():
    p = _plan(PD)
    head = next(pr for pr in p.processes if pr.kind == "router")
    assert head.argv[head.argv.index("--router-mode") + 1] == "kv"
    pre, dec = (next(pr for pr in p.processes if pr.role == r) for r in ("prefill", "decode"))
    assert pre.argv[pre.argv.index("--disaggregation-mode"):] == [
        "--disaggregation-mode", "prefill", "--bootstrap-ports", str(pre.ports["bootstrap"]),
        "--speedup-ratio", "10.0", "--block-size", "16"]
    assert dec.argv[dec.argv.index("--disaggregation-mode") + 1] == "decode" and "--bootstrap-ports" not in dec.argv


def test_sglang_engine_runs_dynamo_sglang_with_sglangs_flags_from_the_engine_python():
    p = _plan(PD, "engine.kind=sglang", "engine.mock={}", "engine.python=/opt/py/bin/python",
              "prefill.args={}", "decode.args={}")
    assert p.engine == "dynamo-sglang"
    pre = next(pr for pr in p.processes if pr.role == "prefill")
    assert pre.argv[:3] == ["/opt/py/bin/python", "-m", "dynamo.sglang"]
    assert pre.argv[pre.argv.index("--served-model-name") + 1] == "tiny"
    assert pre.argv[pre.argv.index("--disaggregation-bootstrap-port") + 1] == str(pre.ports["bootstrap"])


def test_multi_node_replica_serves_from_rank_0_only():
    p = _plan(PD, "engine.kind=sglang", "engine.mock={}", "prefill.args={}", "decode.args={}", "prefill.nodes=2",
              "prefill.tp=16")
    r0, r1 = (pr for pr in p.processes if pr.name.startswith("prefill-0"))
    assert (r0.node_rank, r1.node_rank) == (0, 1) and r0.argv[r0.argv.index("--nnodes") + 1] == "2"
    assert r0.env["DYN_SYSTEM_PORT"] == str(r0.ports["http"]) and "DYN_SYSTEM_PORT" not in r1.env
    assert r1.env["DYN_FILE_KV"] == "{run_dir}/dynamo/{epoch}" and r1.ports == {}


def test_default_stack_is_unchanged():
    p = _plan(AGG, "stack=sglang")
    head = next(pr for pr in p.processes if pr.kind == "router")
    assert p.stack == "sglang" and p.engine == "mock" and head.argv[2] == "hpcserve.router" and head.env == {}
    assert not any(k.startswith("DYN_") for pr in p.processes for k in pr.env)


@pytest.mark.parametrize("stack, api", [("dynamo", ["--api", "completions"]), ("sglang", [])])
def test_batch_stage_sends_prompt_rows_the_way_the_stack_serves_them(stack, api):
    """Dynamo's frontend has no /generate: the plan tells the batch driver to send prompt and input_ids rows
    to /v1/completions; the sglang stack keeps /generate (the default, left off the command line)."""
    p = _plan(AGG, f"stack={stack}", "batch.input=in.jsonl", "batch.output=out.jsonl")
    [batch] = [pr for pr in p.processes if pr.kind == "batch"]
    argv = batch.argv[batch.argv.index("hpcserve.batch") + 1:]
    assert [a for a in argv if a in ("--api", "completions", "generate")] == api


@pytest.mark.parametrize("override,message", [
    ("stack=dinamo", "stack: unknown stack 'dinamo'; choose one of: dynamo, sglang"),
    ("engine.kind=torch", "engine.kind: torch has no Dynamo worker; use mock or sglang with stack: dynamo"),
    ("engine.kind=dynamo-mocker", "unknown engine kind 'dynamo-mocker'; choose one of: mock, sglang, torch"),
    ("router.api_key_env=KEY", "router.api_key_env: Dynamo's frontend checks no API key"),
])
def test_user_mistakes_name_the_fix(override, message):
    extra = ["engine.mock={}"] if override == "engine.kind=torch" else []
    with pytest.raises(HpcserveError) as e:
        _plan(AGG, override, *extra)
    assert message in str(e.value)


def test_user_mistake_is_one_line_exit_2():
    res = _validate(AGG, "--set", "stack=dinamo")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "choose one of" in res.stderr


def _engine_check(recipe, *overrides):
    return check_plan_engine_args(_plan(recipe, *overrides))


def test_engine_check_uses_dynamos_own_parser():
    pytest.importorskip("dynamo.mocker", reason="ai-dynamo not installed (tests/run.sh install_dynamo)")
    assert _engine_check(AGG) == [] and _engine_check(PD) == []
    assert _engine_check(AGG, "workers.args.page-size=16") == [   # an SGLang flag, not the mocker's
        "workers-0: unrecognized arguments: --page-size 16", "workers-1: unrecognized arguments: --page-size 16"]
    bootstrap = _plan(PD).workers[0].port + 2
    assert _engine_check(PD, "prefill.args.num-workers=2") == [   # Dynamo's own validation after parsing
        f"prefill-0: --bootstrap-ports must have exactly --num-workers (2) ports, got 1: [{bootstrap}]"]
    res = _validate(PD, "--engine-check", "--set", "decode.args.bogus-flag=1")
    assert res.returncode == 2 and "decode-0: unrecognized arguments: --bogus-flag 1" in res.stderr, res.stderr
    assert "engine check: dynamo.mocker's parser (ai-dynamo 1.6.1)" in res.stderr   # not SGLang's version note


def test_engine_check_of_dynamo_sglang_says_when_it_cannot_import(monkeypatch):
    """dynamo.sglang imports SGLang's engine (torch, torchvision, CUDA kernels), which fails on this CPU machine
    after seconds of importing; a None entry in sys.modules makes the same ImportError immediate."""
    monkeypatch.setitem(sys.modules, "dynamo.sglang.args", None)
    with pytest.raises(HpcserveError) as e:
        _engine_check(AGG, "engine.kind=sglang", "engine.mock={}")
    assert str(e.value).startswith("--engine-check of dynamo.sglang needs dynamo.sglang importable here")
    assert "\n" not in str(e.value)


def _health(*instances):
    return {"status": "healthy", "instances": [
        {"component": c, "endpoint": e, "instance_id": i} for c, e, i in instances]}


def test_count_instances_counts_generate_endpoints_per_component():
    h = _health(("backend", "generate", 1), ("backend", "worker_kv_query_source_x", 1), ("prefill", "generate", 2),
                ("backend", "generate", 3))
    assert (count_instances(h, "backend"), count_instances(h, "prefill"), count_instances(h, "other")) == (2, 1, 0)


def test_frontend_readiness_needs_every_planned_worker_and_the_model():
    p = _plan(PD)
    answers = {"health": _health(("prefill", "generate", 7)), "models": {"data": []}}

    async def health(_):
        return web.json_response(answers["health"])

    async def models(_):
        return web.json_response(answers["models"])

    async def run():
        app = web.Application()
        app.add_routes([web.get("/health", health), web.get("/v1/models", models)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        seen = []
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                ready = lambda: get_stack("dynamo").head_ready(s, url, p)  # noqa: E731
                seen.append(await ready())                                   # decode worker missing
                answers["health"] = _health(("prefill", "generate", 7), ("backend", "generate", 8))
                seen.append(await ready())                                   # no model listed yet
                answers["models"] = {"data": [{"id": "tiny"}]}
                seen.append(await ready())
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                seen.append(await get_stack("dynamo").head_ready(s, "http://127.0.0.1:9", p))   # nothing there
        finally:
            await runner.cleanup()
        return seen

    assert asyncio.run(run()) == [False, False, True, False]
    assert json.loads(p.to_json())["stack"] == "dynamo"
