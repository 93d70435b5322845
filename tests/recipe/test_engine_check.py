"""Every SGLang command line of every example plan passes SGLang 0.5.23's own parser; a typo in engine args is
caught by `hpcserve validate --engine-check` before anything is queued."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpcserve.api import load_plans
from hpcserve.cli.main import app
from hpcserve.engines.check import check_plan_engine_args, sglang_argv
from hpcserve.engines.sglang_check import sglang_available

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.sglang, pytest.mark.skipif(not sglang_available(), reason="sglang not importable")]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_plan_passes_sglangs_parser(recipe):
    plans = load_plans(recipe, python="python3")
    engines = [p for _, plan in plans for p in plan.processes if p.kind == "engine"]
    assert engines
    for _, plan in plans:
        assert check_plan_engine_args(plan) == []


def test_placeholders_are_filled_and_mock_options_dropped():
    [(_, plan)] = load_plans(REPO / "recipes/local-demo.yaml", python="python3")
    argv = sglang_argv(next(p for p in plan.processes if p.kind == "engine").argv)
    assert "--host" in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert not any(a.startswith("--mock-") for a in argv)


def test_typo_in_engine_args_is_caught(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((REPO / "recipes/llama70b-1p1d.yaml").read_text().replace("mem-fraction-static: 0.88",
                                                                            "mem-fraction-statc: 0.88")
                   .replace("../slurm/clusters/eos-h100.yaml", str(REPO / "slurm/clusters/eos-h100.yaml")))
    res = CliRunner().invoke(app, ["validate", "--engine-check", str(bad)])
    assert res.exit_code == 2
    assert "decode-0: unknown flag --mem-fraction-statc (did you mean --mem-fraction-static?)" in res.output


WIDE_EP = """\
# DeepSeek wide-EP shape (as srt-slurm's public recipes lay it out): TP16 prefill over two nodes, and a decode
# over two nodes with DP attention (dp 8) and expert parallelism across all 16 GPUs.
name: dsr1-wide-ep
model: {{path: /models/DeepSeek-R1, served_name: dsr1}}
engine: {{kind: sglang, version: "{version}"}}
cluster: {{backend: slurm, gpus_per_node: 8, address: auto}}
prefill: {{replicas: 1, nodes: 2, tp: 16, args: {{trust-remote-code: true}}}}
decode:
  replicas: 1
  nodes: 2
  tp: 16
  dp: 8
  ep: 16
  args: {{enable-dp-attention: true, trust-remote-code: true, moe-a2a-backend: deepep}}
kv_transfer: {{backend: mooncake}}
"""


def test_dp_attention_decode_spanning_nodes_is_accepted(tmp_path):
    path = tmp_path / "wide-ep.yaml"
    path.write_text(WIDE_EP.format(version="0.5.23"))
    [(_, plan)] = load_plans(path, python="python3")
    decode = [p for p in plan.processes if p.kind == "engine" and p.role == "decode"]
    assert [p.argv[p.argv.index("--nnodes") + 1] for p in decode] == ["2", "2"]
    assert "--enable-dp-attention" in decode[0].argv and "--dp-size" in decode[0].argv
    assert check_plan_engine_args(plan) == []
    # plain data-parallel replicas over nodes stay refused, as SGLang refuses them
    path.write_text(WIDE_EP.format(version="0.5.23").replace("enable-dp-attention: true, ", "")
                    .replace("  tp: 16\n  dp: 8", "  tp: 2\n  dp: 8"))
    [(_, plain)] = load_plans(path, python="python3")
    assert any("does not support multi-node data-parallel replicas" in e for e in check_plan_engine_args(plain))


def test_engine_check_names_the_sglang_it_used_and_warns_on_a_mismatch(tmp_path):
    path = tmp_path / "wide-ep.yaml"
    path.write_text(WIDE_EP.format(version="0.5.23"))
    res = CliRunner().invoke(app, ["validate", "--engine-check", str(path)])
    assert res.exit_code == 0, res.output
    assert "engine check: sglang 0.5.23 (matches engine.version)" in res.output
    path.write_text(WIDE_EP.format(version="0.4.9"))
    res = CliRunner().invoke(app, ["validate", "--engine-check", str(path)])
    assert ("warning: engine check used sglang 0.5.23 installed here but the recipe pins engine.version 0.4.9: "
            "flags may differ") in res.output
