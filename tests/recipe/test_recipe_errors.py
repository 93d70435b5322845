"""Every user mistake the recipe layer knows about: one line naming the key and the fix, exit 2."""

from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from hpcserve.cli.main import app
from hpcserve.errors import RecipeError
from hpcserve.recipe.load import load_recipe

GOOD = """\
name: t
model: {path: /models/m}
engine: {kind: mock}
cluster: {backend: local, gpus_per_node: 8}
prefill: {replicas: 1, tp: 4}
decode: {replicas: 1, tp: 4}
"""


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_recipe_loads(tmp_path):
    [lr] = load_recipe(write(tmp_path, GOOD))
    assert lr.recipe.prefill.tp == 4 and lr.recipe.disaggregated


def test_unknown_key_with_suggestion_and_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("prefill: {replicas: 1, tp: 4}", "prefill:\n  replicas: 1\n  tpp: 4"))
    assert msg.endswith("r.yaml:7 prefill.tpp: unknown key (did you mean 'tp'?)")


def test_unknown_top_level_key(tmp_path):
    msg = error_of(tmp_path, GOOD + "routr: {port: 9000}\n")
    assert "r.yaml:7 routr: unknown key (did you mean 'router'?)" in msg


def test_missing_model_path(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("model: {path: /models/m}", "model: {served_name: x}"))
    assert "r.yaml:2 model.path: required key is missing; add it" in msg


def test_tp_dp_larger_than_replica_gpus(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("decode: {replicas: 1, tp: 4}", "decode: {replicas: 1, tp: 4, dp: 2, gpus: 4}"))
    assert "decode.tp: tp*dp = 8 does not fit the replica's 4 GPUs; raise decode.gpus or lower tp/dp" in msg
    assert "r.yaml:6" in msg


def test_gpus_not_dividing_node(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("decode: {replicas: 1, tp: 4}", "decode: {replicas: 1, tp: 3}"))
    assert "decode.gpus: 3 GPUs per replica do not divide the node's 8 GPUs evenly" in msg


def test_replica_larger_than_node_names_nodes(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("decode: {replicas: 1, tp: 4}", "decode: {replicas: 1, tp: 16}"))
    assert "set decode.nodes to 2" in msg


@pytest.mark.parametrize("flag", ["port", "host", "tp", "nnodes", "node-rank", "dist-init-addr",
                                  "disaggregation-mode", "disaggregation-bootstrap-port", "model-path"])
def test_managed_engine_flag_collision(tmp_path, flag):
    msg = error_of(tmp_path, GOOD.replace("decode: {replicas: 1, tp: 4}",
                                          f"decode: {{replicas: 1, tp: 4, args: {{{flag}: 1}}}}"))
    assert f"decode.args: '{flag}' is managed by hpcserve" in msg and "remove it from args" in msg


def test_time_unlimited_refused(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("gpus_per_node: 8}", "gpus_per_node: 8, time: UNLIMITED}"))
    assert "cluster.time: UNLIMITED is not allowed; give a limit such as 04:00:00" in msg


def test_time_unlimited_in_passthrough_refused(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("gpus_per_node: 8}", "gpus_per_node: 8, sbatch: ['--time=UNLIMITED']}"))
    assert "--time=UNLIMITED is not allowed" in msg


@pytest.mark.parametrize("port", [80, 70000])
def test_port_out_of_range(tmp_path, port):
    msg = error_of(tmp_path, GOOD + f"router: {{port: {port}}}\n")
    assert f"router.port: port {port} is outside 1024-65535" in msg
    assert "r.yaml:7" in msg


def test_empty_topology(tmp_path):
    msg = error_of(tmp_path, "\n".join(GOOD.splitlines()[:4]) + "\n")
    assert "empty topology: give `workers:` (aggregated) or `prefill:` and `decode:` (PD)" in msg


def test_pd_missing_side(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("decode: {replicas: 1, tp: 4}\n", ""))
    assert "decode: PD needs both sides; add a `decode:` group" in msg


def test_sweep_over_missing_key(tmp_path):
    msg = error_of(tmp_path, GOOD + "sweep:\n  prefil.tp: [1, 2]\n")
    assert "r.yaml:8 sweep.prefil.tp: no such recipe key" in msg


def test_sweep_expands_cartesian(tmp_path):
    lrs = load_recipe(write(tmp_path, GOOD + "sweep:\n  prefill.tp: [2, 4]\n  decode.replicas: [1, 2, 3]\n"))
    assert [(lr.recipe.prefill.tp, lr.recipe.decode.replicas) for lr in lrs] == [
        (2, 1), (2, 2), (2, 3), (4, 1), (4, 2), (4, 3)]


def test_invalid_yaml_has_line(tmp_path):
    msg = error_of(tmp_path, GOOD + "decode: [unclosed\n")
    assert msg.startswith(str(tmp_path / "r.yaml") + ":") and "invalid YAML" in msg
    line = int(msg.split(":")[1].split()[0])
    assert line >= 7


def test_set_wrong_type(tmp_path):
    msg = error_of(tmp_path, GOOD, ["decode.tp=eight"])
    assert msg.startswith("--set decode.tp=eight: Input should be a valid integer")


def test_set_overrides_value(tmp_path):
    [lr] = load_recipe(write(tmp_path, GOOD), ["decode.replicas=2", "cluster.partition=gpu"])
    assert lr.recipe.decode.replicas == 2 and lr.recipe.cluster.partition == "gpu"


def test_unknown_engine_kind(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("kind: mock", "kind: vllm"))
    assert "engine.kind: unknown engine kind 'vllm'; choose one of: mock, sglang" in msg


def test_profile_validated_strictly(tmp_path):
    (tmp_path / "prof.yaml").write_text("backend: slurm\npartitoin: debug\n")
    msg = error_of(tmp_path, GOOD.replace("cluster: {backend: local, gpus_per_node: 8}", "cluster: prof.yaml"))
    assert msg.endswith("prof.yaml:2 partitoin: unknown key (did you mean 'partition'?)")


def test_cli_exit_code_and_no_traceback(tmp_path):
    bad = write(tmp_path, GOOD.replace("tp: 4}\ndecode", "tpp: 4}\ndecode"))
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    out = res.output.strip()
    assert "Traceback" not in out
    assert out.count("\n") == 0 and "prefill.tpp: unknown key (did you mean 'tp'?)" in out


def test_sglang_router_policy_without_least_load(tmp_path):
    msg = error_of(tmp_path, GOOD + "router: {kind: sglang}\n")
    assert "r.yaml:7 router.decode_policy: sglang-router has no least_load policy" in msg


def test_engine_options_for_another_kind(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("engine: {kind: mock}", "engine: {kind: sglang, mock: {time-scale: 0}}"))
    assert "engine.mock: options for the mock engine but engine.kind is sglang" in msg


def test_cluster_override_names_the_recipe_settings_it_replaces():
    """--cluster PROFILE replaces an inline cluster section; the settings that change are said, not dropped."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    demo, local = repo / "recipes/local-demo.yaml", str(repo / "slurm/clusters/local.yaml")
    [lr] = load_recipe(demo, [], local)
    assert lr.notes == (f"--cluster {local} replaces the recipe's own cluster settings: backend 'local' -> 'slurm', "
                        f"gpus_per_node 0 -> 8, time '01:00:00' -> '00:30:00'",)
    assert load_recipe(demo)[0].notes == ()          # no override, nothing to say
    res = subprocess.run([sys.executable, "-m", "hpcserve", "validate", str(demo), "--cluster", local],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and f"note: {lr.notes[0]}" in res.stderr.splitlines(), res.stderr


def test_drain_longer_than_the_time_limit_signal_is_refused(tmp_path):
    """The agents drain after Slurm's time-limit signal; a drain longer than the warning is cut by the limit."""
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(RecipeError, match=r"timeouts.drain: 30 s must be shorter than cluster.signal_seconds \(20 s\)"):
        load_recipe(repo / "recipes/local-demo.yaml", ["cluster.backend=slurm", "cluster.signal_seconds=20"])
    assert load_recipe(repo / "recipes/local-demo.yaml", ["cluster.signal_seconds=20"])   # local: no time limit
