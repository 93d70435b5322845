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

REPO = Path(__file__).resolve().parent.parent
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
