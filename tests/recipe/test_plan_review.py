"""Findings of the rendered-job review (issue 14 item 6), on recipes of four shapes written after srt-slurm's
public recipes: packed TP2 prefill/decode, TP16 over two nodes, DeepSeek wide-EP with DP attention, and
aggregated TP8. Each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpcserve.api import load_plans
from hpcserve.cli.main import app
from hpcserve.errors import RecipeError

CLUSTER = "cluster: {backend: slurm, gpus_per_node: 8, address: auto, partition: gpu}"

PACKED_TP2 = f"""\
name: packed-tp2
model: {{path: /models/Llama-3.1-8B-Instruct}}
engine: {{kind: sglang, version: "0.5.23"}}
{CLUSTER}
prefill: {{replicas: 2, tp: 2}}
decode: {{replicas: 2, tp: 2}}
kv_transfer: {{backend: nixl}}
"""

TP16_TWO_NODES = f"""\
name: tp16-2n
model: {{path: /models/Llama-3.1-405B-Instruct-FP8}}
engine: {{kind: sglang, version: "0.5.23"}}
{CLUSTER}
workers: {{replicas: 1, nodes: 2, tp: 16}}
benchmark: {{isl: 1024, osl: 256, concurrency: [1, 8]}}
"""

WIDE_EP = f"""\
name: dsr1-wide-ep
model: {{path: /models/DeepSeek-R1}}
engine: {{kind: sglang, version: "0.5.23"}}
{CLUSTER}
prefill: {{replicas: 1, nodes: 2, tp: 16, args: {{trust-remote-code: true}}}}
decode: {{replicas: 1, nodes: 2, tp: 16, dp: 8, ep: 16, args: {{enable-dp-attention: true}}}}
kv_transfer: {{backend: mooncake, ib_device: mlx5_0}}
benchmark: {{isl: 2048, osl: 1024, concurrency: [64]}}
"""

AGG_TP8_SGLANG_ROUTER = f"""\
name: agg-tp8
model: {{path: /models/Llama-3.3-70B-Instruct}}
engine: {{kind: sglang, version: "0.5.23"}}
{CLUSTER}
workers: {{replicas: 2, tp: 8}}
router: {{kind: sglang, policy: cache_aware}}
"""


def _plan(tmp_path: Path, text: str, overrides: list[str] = ()):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    [(_, plan)] = load_plans(path, list(overrides), python="python3")
    return plan


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_nccl_port_is_planned_and_collides_with_nothing_on_a_packed_node(tmp_path):
    plan = _plan(tmp_path, PACKED_TP2)
    engines = [p for p in plan.processes if p.kind == "engine"]
    assert plan.num_nodes == 1 and len(engines) == 4
    nccl = [int(_flag(p.argv, "--nccl-port")) for p in engines]
    assert nccl == [20015, 20035, 20055, 20075] == [w.nccl_port for w in plan.workers]
    other = [port for p in plan.processes for port in p.ports.values()]
    assert not set(nccl) & set(other) and len(set(other)) == len(other)
    # packed replicas get disjoint GPUs
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in engines] == ["0,1", "2,3", "4,5", "6,7"]


def _sglang_zmq_ports(argv: list[str]) -> set[int]:
    """The ports SGLang 0.5.23 derives for a DP-attention server (server_args.py PortArgs.init_new): from
    --dist-init-addr's port + 1..6 when given, else from --port + 233 (ZMQ_TCP_PORT_DELTA) + 1..6."""
    if "--dist-init-addr" in argv:
        dist = int(_flag(argv, "--dist-init-addr").rsplit(":", 1)[1])
    else:
        dist = int(_flag(argv, "--port")) + 233
    return {dist, *range(dist + 1, dist + 7)}


def test_single_node_dp_attention_ports_stay_in_the_replicas_block(tmp_path):
    """Without --dist-init-addr SGLang puts a DP-attention server's ZMQ ports at --port + 233..239, inside the
    block of the replica 11 or 12 places later (20 ports per replica): with 14 decode replicas, decode-0's ports
    met decode-11's dist-init and derived ports. The plan now gives every DP-attention replica its dist-init."""
    recipe = WIDE_EP.replace("decode: {replicas: 1, nodes: 2, tp: 16, dp: 8, ep: 16,",
                             "decode: {replicas: 14, tp: 8, dp: 8, ep: 8,")
    plan = _plan(tmp_path, recipe)
    engines = {p.name: p for p in plan.processes if p.kind == "engine"}
    decode = [engines[f"decode-{i}"] for i in range(14)]
    taken = {port: p.name for p in plan.processes for port in p.ports.values()}
    taken.update({int(_flag(p.argv, "--nccl-port")): p.name for p in engines.values() if "--nccl-port" in p.argv})
    for p in plan.processes:  # multi-node prefill ranks derive ports from their dist-init too
        if "--dist-init-addr" in p.argv and p.node_rank == 0:
            taken.update({port: p.name for port in _sglang_zmq_ports(p.argv)})
    for p in decode:
        port = int(_flag(p.argv, "--port"))
        derived = _sglang_zmq_ports(p.argv)
        assert all(port < d < port + 20 for d in derived), (p.name, sorted(derived))   # its own block
        assert _flag(p.argv, "--dist-init-addr") == f"{{host:{p.node}}}:{port + 10}" and p.ports["dist_init"] == port + 10
        assert {taken.get(d, p.name) for d in derived} == {p.name}, p.name   # nobody else's port
        taken.update({d: p.name for d in derived})
    assert "--nnodes" not in decode[0].argv   # still a single-node server


def test_multi_node_replica_packs_the_head_node_when_not_dedicated(tmp_path):
    plan = _plan(tmp_path, TP16_TWO_NODES)
    assert plan.num_nodes == 2   # was 3: the head node held only Redis and the router
    rank0 = next(p for p in plan.processes if p.name == "workers-0-rank0")
    assert rank0.node == plan.head_node == 0 and rank0.gpus == list(range(8))
    assert plan.nodes[0].roles == ["head", "both"]
    dedicated = _plan(tmp_path, TP16_TWO_NODES, ["router.dedicated_node=true"])
    assert dedicated.num_nodes == 3 and dedicated.nodes[0].gpus_used == []
    wide = _plan(tmp_path, WIDE_EP)
    assert wide.num_nodes == 4   # was 5
    assert [w.nodes for w in wide.workers] == [[0, 1], [2, 3]]


def test_bench_gpus_count_each_gpu_once(tmp_path):
    assert _flag(next(p for p in _plan(tmp_path, TP16_TWO_NODES).processes if p.kind == "bench").argv,
                 "--gpus") == "16"   # was 32
    assert _flag(next(p for p in _plan(tmp_path, WIDE_EP).processes if p.kind == "bench").argv,
                 "--gpus") == "32"   # was 64


def test_aggregated_recipe_with_sglang_router_is_accepted(tmp_path):
    plan = _plan(tmp_path, AGG_TP8_SGLANG_ROUTER)
    router = next(p for p in plan.processes if p.kind == "router")
    assert router.argv[2] == "sglang_router.launch_router" and _flag(router.argv, "--policy") == "cache_aware"
    # a PD recipe with sglang-router still has to pick a decode policy sglang-router has
    with pytest.raises(RecipeError, match="router.decode_policy: sglang-router has no least_load policy"):
        _plan(tmp_path, PACKED_TP2 + "router: {kind: sglang}\n")


def test_kv_transfer_default_is_said_where_it_differs_from_sglang(tmp_path):
    implicit = PACKED_TP2.replace("kv_transfer: {backend: nixl}\n", "")
    plan = _plan(tmp_path, implicit)
    assert plan.notes == ["kv_transfer.backend: nixl (hpcserve's default; SGLang's own default is mooncake, "
                          "which also needs kv_transfer.ib_device); set kv_transfer.backend to choose"]
    assert "--disaggregation-transfer-backend" in next(p for p in plan.processes if p.kind == "engine").argv
    assert _plan(tmp_path, PACKED_TP2).notes == []   # chosen explicitly: nothing to say
    assert _plan(tmp_path, AGG_TP8_SGLANG_ROUTER).notes == []   # no KV transfer at all
    (tmp_path / "r.yaml").write_text(implicit)
    for verb in (["validate"], ["render"]):
        res = CliRunner().invoke(app, [*verb, str(tmp_path / "r.yaml")])
        assert res.exit_code == 0, res.output
        assert "note: kv_transfer.backend: nixl (hpcserve's default; SGLang's own default is mooncake" in res.output
