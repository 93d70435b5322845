"""Planner: determinism, golden files, layout properties, multi-node wiring."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcserve.api import load_plans, write_plans
from hpcserve.plan.build import plan
from hpcserve.recipe.schema import Recipe
from hpcserve.render import render_sbatch

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
GOLDEN_CASES = [("llama70b-1p1d", None), ("local-demo", None), ("llama70b-1p1d", "slurm/clusters/local.yaml")]


def _golden_name(name: str, cluster: str | None) -> str:
    return name + ("-localprofile" if cluster else "")


@pytest.mark.parametrize("name,cluster", GOLDEN_CASES)
def test_golden_plan_and_script(name, cluster):
    [(_, p)] = load_plans(REPO / "recipes" / f"{name}.yaml", cluster=str(REPO / cluster) if cluster else None,
                          python="python3")
    got = {"plan.json": p.to_json().decode(), "job.sbatch": render_sbatch(p)}
    for fname, text in got.items():
        path = GOLDEN / _golden_name(name, cluster) / fname
        if os.environ.get("UPDATE_GOLDEN") == "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert text == path.read_text(), f"{path} differs; UPDATE_GOLDEN=1 if the change is intended"


def test_gpu_profile_keeps_gpu_directives_local_profile_drops_them():
    [(_, gpu)] = load_plans(REPO / "recipes/llama70b-1p1d.yaml", python="python3")
    [(_, local)] = load_plans(REPO / "recipes/llama70b-1p1d.yaml", cluster=str(REPO / "slurm/clusters/local.yaml"),
                              python="python3")
    assert "#SBATCH --gpus-per-node=8\n" in render_sbatch(gpu)
    # the agents run outside the image; the engines go in through the runtime (tests/slurm/test_containers.py)
    assert "--exclusive" in render_sbatch(gpu) and "--container-image=" not in render_sbatch(gpu)
    assert "--gpus-per-node" not in render_sbatch(local)
    assert "#SBATCH --partition=debug\n" in render_sbatch(local)
    # the layout itself does not depend on whether GRES is requested
    assert [pr.gpus for pr in gpu.processes] == [pr.gpus for pr in local.processes]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_example_renders_byte_identically(recipe, tmp_path):
    a = write_plans(load_plans(recipe, python="python3"), tmp_path / "a")
    b = write_plans(load_plans(recipe, python="python3"), tmp_path / "b")
    assert len(a) == len(b) >= 1
    for da, db in zip(a, b):
        for f in ("recipe.resolved.yaml", "plan.json", "job.sbatch"):
            assert (da / f).read_bytes() == (db / f).read_bytes()
        assert (da / "logs").is_dir()


def test_sweep_writes_one_dir_per_point(tmp_path):
    dirs = write_plans(load_plans(REPO / "recipes/sweep-chunked-prefill.yaml", python="python3"), tmp_path)
    assert [d.name for d in dirs] == ["point-00", "point-01", "point-02", "point-03"]
    assert (tmp_path / "sweep.json").exists()
    from hpcserve.plan.model import Plan
    p3 = Plan.from_json((dirs[3] / "plan.json").read_bytes())
    assert p3.point == {"prefill.args.chunked-prefill-size": 16384, "decode.replicas": 2}
    assert [w.id for w in p3.workers] == ["prefill-0", "decode-0", "decode-1"]
    pre = next(pr for pr in p3.processes if pr.worker_id == "prefill-0")
    assert pre.argv[pre.argv.index("--chunked-prefill-size") + 1] == "16384"


def test_deepseek_multinode_prefill_ranks_share_dist_init():
    [(_, p)] = load_plans(REPO / "recipes/deepseek-2p4d.yaml", python="python3")
    ranks = [pr for pr in p.processes if pr.worker_id == "prefill-1" or pr.name.startswith("prefill-1-")]
    assert [pr.node_rank for pr in ranks] == [0, 1]
    addrs = {pr.argv[pr.argv.index("--dist-init-addr") + 1] for pr in ranks}
    assert len(addrs) == 1 and addrs.pop() == f"{{host:{ranks[0].node}}}:20040"
    assert ranks[0].node != ranks[1].node
    assert [pr.argv[pr.argv.index("--node-rank") + 1] for pr in ranks] == ["0", "1"]
    # only rank 0 listens; rank 1 connects, so the agent must not check its dist_init port as "free"
    assert ranks[0].ports["dist_init"] == 20040 and ranks[1].ports == {}
    assert p.nodes[0].roles == ["head"]          # dedicated head node
    assert p.num_nodes == 9


def test_aggregated_replicas_get_disjoint_gpus():
    [(_, p)] = load_plans(REPO / "recipes/llama8b-agg.yaml", python="python3")
    eng = [pr for pr in p.processes if pr.kind == "engine"]
    assert [pr.env["CUDA_VISIBLE_DEVICES"] for pr in eng] == ["0,1", "2,3", "4,5", "6,7"]
    assert {pr.node for pr in eng} == {0} and p.num_nodes == 1


def _recipe(prefill, decode, workers, gpn, dedicated):
    d = {"name": "prop", "model": {"path": "/m"}, "engine": {"kind": "mock"},
         "cluster": {"backend": "local", "gpus_per_node": gpn}, "router": {"port": 8000, "dedicated_node": dedicated}}
    if workers:
        d["workers"] = workers
    else:
        d["prefill"], d["decode"] = prefill, decode
    return Recipe.model_validate(d)


def _group(gpn):
    single = st.builds(lambda tp, r: {"replicas": r, "tp": tp},
                       st.sampled_from([t for t in (1, 2, 4, 8) if gpn % t == 0 and t <= gpn]), st.integers(1, 5))
    multi = st.builds(lambda n, r: {"replicas": r, "nodes": n, "tp": n * gpn}, st.integers(2, 3), st.integers(1, 3))
    return st.one_of(single, multi)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), gpn=st.sampled_from([2, 4, 8]), pd=st.booleans(), dedicated=st.booleans())
def test_property_no_port_or_gpu_shared_on_a_node(data, gpn, pd, dedicated):
    if pd:
        r = _recipe(data.draw(_group(gpn)), data.draw(_group(gpn)), None, gpn, dedicated)
    else:
        r = _recipe(None, None, data.draw(_group(gpn)), gpn, dedicated)
    p = plan(r, python="python3")
    ports_by_node: dict[int, list[int]] = {}
    gpus_by_node: dict[int, list[int]] = {}
    all_ports = []
    for pr in p.processes:
        ports_by_node.setdefault(pr.node, []).extend(pr.ports.values())
        gpus_by_node.setdefault(pr.node, []).extend(pr.gpus)
        if pr.node_rank == 0:
            all_ports.extend(pr.ports.values())
    for node, ports in ports_by_node.items():
        assert len(ports) == len(set(ports)), f"port shared on node {node}"
    for node, gpus in gpus_by_node.items():
        assert len(gpus) == len(set(gpus)), f"GPU shared on node {node}"
        assert all(0 <= g < gpn for g in gpus)
    # every GPU a replica asked for is given exactly once
    want = sum(g.replicas * (g.nodes * gpn if g.nodes > 1 else g.tp) for g in r.groups().values())
    assert sum(len(v) for v in gpus_by_node.values()) == want
    # all nodes share one host on test clusters: ports are unique plan-wide, not only per node
    assert len(all_ports) == len(set(all_ports))
    assert all(1024 <= x <= 65535 for x in all_ports)
    assert sorted(n.index for n in p.nodes) == list(range(p.num_nodes))
