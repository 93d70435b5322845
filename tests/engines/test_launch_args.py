"""The launch contracts of hpcserve/cmdline/: one class per process kind writes its argv (the planner) and
parses it back (the process), and the recipe's reserved names and defaults come from the same class."""

from __future__ import annotations

import importlib.util

import pytest

from hpcserve.cmdline.server import SHORTHAND, ServerArgs
from hpcserve.engines import sglang_check
from hpcserve.engines.base import WorkerLaunch, sglang_server_flags
from hpcserve.errors import UsageError
from hpcserve.mock.cli import parse_args as mock_parse
from hpcserve.recipe.schema import MANAGED_ENGINE_FLAGS, GroupSpec

PREFILL = WorkerLaunch(model_path="/m/llama", served_name="llama", mode="prefill", host="{addr}", port=20010,
                       tp=8, dp=2, ep=1, nnodes=2, node_rank=1, dist_init_addr="{host:0}:20014",
                       bootstrap_port=20012, nccl_port=20015, transfer_backend="nixl", ib_device="mlx5_0",
                       user_args={"mem-fraction-static": 0.85, "enable-metrics": True})


def test_planner_argv_is_written_by_server_args_and_parses_back_to_the_same_values():
    argv = sglang_server_flags(PREFILL)
    assert argv == ["--model-path", "/m/llama", "--served-model-name", "llama", "--host", "{addr}",
                    "--port", "20010", "--tp-size", "8", "--dp-size", "2", "--nccl-port", "20015",
                    "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "{host:0}:20014",
                    "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl",
                    "--disaggregation-bootstrap-port", "20012", "--disaggregation-ib-device", "mlx5_0",
                    "--mem-fraction-static", "0.85", "--enable-metrics"]
    parsed, rest = ServerArgs.parser().parse_known_args(argv)
    server = ServerArgs.from_namespace(parsed)
    assert rest == ["--mem-fraction-static", "0.85"]            # not ours: the engine's extras
    assert (server.tp_size, server.dp_size, server.ep_size, server.node_rank) == (8, 2, 1, 1)
    assert server.enable_metrics is True and server.disaggregation_bootstrap_port == 20012
    # unset flags stay unset, so writing the parsed values gives the same argv back
    assert server.to_argv() == argv[:-3] + ["--enable-metrics"]
    assert ServerArgs.from_argv(server.to_argv()) == server


def test_the_mock_parses_the_planner_argv_with_the_shared_class_and_keeps_its_own_options():
    argv = sglang_server_flags(PREFILL) + ["--mock-time-scale", "0.5"]
    cfg = mock_parse([a.replace("{addr}", "10.0.0.2").replace("{host:0}", "10.0.0.1") for a in argv])
    assert (cfg.host, cfg.tp_size, cfg.nccl_port, cfg.dist_init_addr) == ("10.0.0.2", 8, 20015, "10.0.0.1:20014")
    assert cfg.time_scale == 0.5 and cfg.extra_args == {"mem_fraction_static": "0.85"}
    assert cfg.server_args()["nccl_port"] == 20015               # /server_info reports SGLang's names


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port 0 is not a TCP port (1-65535)"),
    (["--tp-size", "0"], "--tp-size must be at least 1"),
    (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "--node-rank 2 is outside 0..1 (--nnodes 2)"),
    (["--nnodes", "2", "--dist-init-addr", "nohost"], "--dist-init-addr 'nohost' must look like HOST:PORT"),
    (["--disaggregation-mode", "both"], "argument --disaggregation-mode: invalid choice: 'both'"),
])
def test_server_flag_mistakes_are_one_usage_error(argv, message):
    with pytest.raises(UsageError) as err:
        ServerArgs.from_argv(["--model-path", "m", *argv]).check()
    assert str(err.value).startswith(message)


def test_recipe_reserves_every_spelling_of_every_planned_flag():
    assert {"tp", "tp-size", "tensor-parallel-size", "model", "model-path", "nccl-init-addr", "nccl-port",
            "disaggregation-bootstrap-port", "base-gpu-id"} <= MANAGED_ENGINE_FLAGS
    assert not {"context-length", "enable-metrics", "api-key"} & MANAGED_ENGINE_FLAGS   # a recipe may set these
    with pytest.raises(ValueError, match="'nccl_init_addr' is managed by hpcserve"):
        GroupSpec(args={"nccl_init_addr": "h:1"})


@pytest.mark.sglang
def test_server_args_names_and_defaults_are_sglangs():
    if importlib.util.find_spec("sglang") is None or not sglang_check.sglang_available():
        pytest.skip(f"sglang not importable: {sglang_check.sglang_unavailable_reason() or 'not installed'}")
    for name, field in ServerArgs.model_fields.items():
        spellings = ServerArgs.sglang_spellings(name)
        info = sglang_check.flag_info(spellings[0])
        assert info is not None, f"SGLang has no {spellings[0]}"
        assert sorted(info["names"]) == sorted(spellings), name
        if field.default is not None and not field.is_required():
            assert info["default"] == field.default, name
    assert all(sglang_check.flag_info(s) is None for spellings in SHORTHAND.values() for s in spellings)


# ---- the router

def test_router_argv_written_by_the_planner_parses_back_and_round_trips():
    from hpcserve.cmdline.router import RouterArgs
    args = RouterArgs(host="{addr}", port=8000, mode="pd", run_id="{run_id}", served_model_name="demo",
                      prefill=[("http://a:1", 8998)], decode=["http://b:2"], api_key_env="KEY")
    argv = args.to_argv()
    assert argv == ["--host", "{addr}", "--port", "8000", "--mode", "pd", "--run-id", "{run_id}",
                    "--served-model-name", "demo", "--prefill", "http://a:1", "8998", "--decode", "http://b:2",
                    "--api-key-env", "KEY"]
    assert RouterArgs.from_argv(argv) == args
    assert RouterArgs.from_argv(["--prefill", "http://a:1"]).prefill == [("http://a:1", 8998)]


def test_one_set_of_router_policies_and_defaults_for_the_router_and_the_recipe():
    from hpcserve.cmdline.router import POLICY_NAMES
    from hpcserve.recipe.schema import RouterSpec
    from hpcserve.router.config import parse_args
    from hpcserve.router.policies import POLICIES
    assert sorted(POLICIES) == sorted(POLICY_NAMES)
    alone = parse_args(["--worker", "http://127.0.0.1:1"])
    spec = RouterSpec()
    assert (alone.policy, alone.prefill_policy, alone.decode_policy) == \
        (spec.policy, spec.prefill_policy, spec.decode_policy) == ("round_robin", "cache_aware", "least_load")
    assert RouterSpec(policy="kv_aware").policy == "kv_aware"      # every policy the router has
    with pytest.raises(ValueError, match="sglang-router has no kv_aware policy"):
        RouterSpec(kind="sglang", policy="kv_aware").check_sglang_policies(disaggregated=False)


@pytest.mark.parametrize("argv, message", [
    (["--worker", "u", "--prefill", "p", "9"], "--worker is for --mode aggregated"),
    (["--prefill", "p", "x"], "--prefill p: bootstrap port 'x' must be a number in 1-65535"),
    (["--worker", "u", "--port", "x"], "argument --port: invalid int value: 'x'"),
    (["--worker", "u", "--policy", "fastest"], "argument --policy: invalid choice: 'fastest'"),
])
def test_router_flag_mistakes_are_one_usage_error(argv, message):
    from hpcserve.router.config import parse_args
    with pytest.raises(UsageError) as err:
        parse_args(argv)
    assert str(err.value).startswith(message)


# ---- the node agent and the batch driver

def test_agent_argv_in_the_batch_script_and_the_local_backend_parses_back():
    from hpcserve.cmdline.agent import AgentArgs
    from hpcserve.render import _agent_argv
    # the batch script quotes each value so the shell expands $RUN_DIR without splitting it
    assert _agent_argv("$RUN_DIR") == '--plan "$RUN_DIR/plan.json" --run-dir "$RUN_DIR"'
    assert _agent_argv("$RUN_DIR", sweep=True) == '--sweep "$RUN_DIR"'
    args = AgentArgs(plan="/r/plan.json", run_dir="/r", node_rank=3)
    assert args.to_argv() == ["--plan", "/r/plan.json", "--run-dir", "/r", "--node-rank", "3"]
    assert AgentArgs.from_argv(args.to_argv()) == args
    assert AgentArgs.from_argv([]).node_rank is None          # SLURM_NODEID decides
    with pytest.raises(UsageError, match="argument --node-rank: invalid int value: 'x'"):
        AgentArgs.from_argv(["--node-rank", "x"])


def test_batch_stage_argv_written_by_the_planner_is_what_the_driver_parses(monkeypatch):
    from hpcserve.cmdline.batch import BatchArgs, ShardArgs
    from hpcserve.plan.router_cmd import batch_spec
    from hpcserve.recipe.schema import Recipe
    recipe = Recipe.model_validate({
        "name": "b", "model": {"path": "/m"}, "engine": {"kind": "mock"}, "workers": {"replicas": 1},
        "router": {"port": 8123}, "batch": {"input": "in.jsonl", "output": "out.jsonl", "concurrency": 7}})
    spec = batch_spec(recipe, 0, "/py", (2, 4), "generate")
    assert spec.argv[:3] == ["/py", "-m", "hpcserve.batch"] and "--api" not in spec.argv   # the default
    assert BatchArgs.from_argv(batch_spec(recipe, 0, "/py", (2, 4), "completions").argv[3:]).api == "completions"
    monkeypatch.setenv("HPCSERVE_REDIS_URL", "redis://h:1/0")     # what the agent gives the stage
    args = BatchArgs.from_argv(spec.argv[3:])
    assert (args.router, args.input, args.output, args.concurrency, args.shard_index, args.num_shards,
            args.run_id, args.redis_url) == ("http://{addr}:8123", "in.jsonl", "out.jsonl", 7, 2, 4, "{run_id}",
                                             "redis://h:1/0")
    assert (args.max_retries, args.request_timeout, args.api_key_env) == (3, 600.0, "HPCSERVE_API_KEY")
    monkeypatch.delenv("HPCSERVE_REDIS_URL")
    assert BatchArgs.from_argv(spec.argv[3:]).redis_url is None
    assert BatchArgs.from_argv(args.to_argv()) == args         # a value from the environment is written out
    # `check` takes the shard part only
    assert ShardArgs.from_argv(["--input", "i", "--output", "o"]).num_shards == 1
    with pytest.raises(UsageError, match="unrecognized arguments: --router"):
        ShardArgs.from_argv(["--input", "i", "--output", "o", "--router", "u"])
