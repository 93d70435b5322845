"""hpcserve.engines.sglang_check against the real sglang parser (CPU only, no GPU, no weights).

Tests marked `sglang` skip when sglang does not import here; tests/run.sh installs it
(install_sglang_check_deps). The lazy-import tests run everywhere.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from hpcserve.engines import sglang_check
from hpcserve.engines.base import WorkerLaunch, sglang_server_flags

HAVE_SGLANG_SPEC = importlib.util.find_spec("sglang") is not None


@pytest.fixture(scope="module")
def sglang_parser():
    if not HAVE_SGLANG_SPEC or not sglang_check.sglang_available():
        pytest.skip(f"sglang not importable: {sglang_check.sglang_unavailable_reason() or 'not installed'}")
    return sglang_check


def _argv_pd(mode: str) -> list[str]:
    argv = ["--model-path", "/lustre/models/Llama-3.1-70B-Instruct", "--served-model-name", "llama-3.1-70b",
            "--host", "0.0.0.0", "--port", "30001", "--tp-size", "8",
            "--disaggregation-mode", mode, "--disaggregation-transfer-backend", "nixl",
            "--disaggregation-ib-device", "mlx5_0", "--mem-fraction-static", "0.85", "--enable-metrics"]
    if mode == "prefill":
        argv += ["--disaggregation-bootstrap-port", "8999", "--chunked-prefill-size", "16384"]
    return argv


@pytest.mark.sglang
def test_pd_prefill_argv_is_accepted_and_parsed(sglang_parser):
    result = sglang_parser.check(_argv_pd("prefill"))
    assert result.errors == []
    sa = result.server_args
    assert (sa.disaggregation_mode, sa.disaggregation_bootstrap_port, sa.tp_size) == ("prefill", 8999, 8)
    assert (sa.disaggregation_transfer_backend, sa.mem_fraction_static) == ("nixl", 0.85)
    assert sa.enable_metrics is True and sa.chunked_prefill_size == 16384


@pytest.mark.sglang
def test_pd_decode_argv_is_accepted_with_default_bootstrap_port(sglang_parser):
    result = sglang_parser.check(_argv_pd("decode"))
    assert result.errors == []
    assert result.server_args.disaggregation_mode == "decode"
    assert result.server_args.disaggregation_bootstrap_port == 8998


@pytest.mark.sglang
def test_two_node_argv_is_accepted(sglang_parser):
    argv = ["--model-path", "/m", "--tp-size", "16", "--nnodes", "2", "--node-rank", "1",
            "--dist-init-addr", "10.0.0.1:5000"]
    result = sglang_parser.check(argv)
    assert result.errors == []
    assert (result.server_args.nnodes, result.server_args.node_rank) == (2, 1)
    assert result.server_args.dist_init_addr == "10.0.0.1:5000"


@pytest.mark.sglang
def test_flags_generated_by_the_sglang_engine_are_accepted(sglang_parser):
    """The argv hpcserve's own engine code writes for a PD prefill worker parses in SGLang."""
    launch = WorkerLaunch(model_path="/m", served_name="m", mode="prefill", host="0.0.0.0", port=30000,
                          tp=4, dp=2, ep=4, bootstrap_port=9001, transfer_backend="mooncake",
                          ib_device="mlx5_0", user_args={"trust-remote-code": True, "enable-metrics": False,
                                                         "json-model-override-args": {"rope_scaling": None}})
    result = sglang_parser.check(sglang_server_flags(launch))
    assert result.errors == []
    sa = result.server_args
    assert (sa.tp_size, sa.dp_size, sa.ep_size, sa.disaggregation_bootstrap_port) == (4, 2, 4, 9001)
    assert sa.trust_remote_code is True and sa.enable_metrics is False
    assert sa.json_model_override_args == '{"rope_scaling":null}'


@pytest.mark.sglang
def test_misspelt_flag_is_rejected_with_a_suggestion(sglang_parser):
    errors = sglang_parser.check_argv(["--model-path", "/m", "--mem-fraction-statc", "0.8"])
    assert errors == ["unknown flag --mem-fraction-statc (did you mean --mem-fraction-static?)"]


@pytest.mark.sglang
def test_underscore_spelling_names_the_dashed_flag(sglang_parser):
    errors = sglang_parser.check_argv(["--model-path", "/m", "--enable_metrics"])
    assert errors == ["unknown flag --enable_metrics: SGLang spells it --enable-metrics"]


@pytest.mark.sglang
def test_bad_choice_names_the_flag_and_the_choices(sglang_parser):
    errors = sglang_parser.check_argv(["--model-path", "/m", "--disaggregation-mode", "both"])
    assert len(errors) == 1
    assert errors[0].startswith("--disaggregation-mode: invalid choice: 'both'")
    assert all(c in errors[0] for c in ("null", "prefill", "decode"))   # quoting differs across Pythons


@pytest.mark.sglang
def test_bad_transfer_backend_choice_is_rejected(sglang_parser):
    errors = sglang_parser.check_argv(["--model-path", "/m", "--disaggregation-transfer-backend", "rdma"])
    assert len(errors) == 1 and errors[0].startswith("--disaggregation-transfer-backend: invalid choice: 'rdma'")
    assert "nixl" in errors[0] and "mooncake" in errors[0]


@pytest.mark.sglang
@pytest.mark.parametrize("argv", [["--tp-size", "eight"], ["--tp-size=eight"], ["--tp", "eight"]])
def test_bad_type_names_the_flag(sglang_parser, argv):
    errors = sglang_parser.check_argv(["--model-path", "/m", *argv])
    assert errors == ["--tp-size/--tensor-parallel-size: invalid int value: 'eight'"]


@pytest.mark.sglang
def test_every_bad_value_and_a_missing_model_path_are_reported_in_one_run(sglang_parser):
    errors = sglang_parser.check_argv(["--tp-size", "eight", "--port", "http", "--mem-fraction-static", "0.8",
                                       "--disaggregation-mode", "both"])
    assert errors[0] == "--tp-size/--tensor-parallel-size: invalid int value: 'eight'"
    assert errors[1] == "--port: invalid int value: 'http'"
    assert errors[2].startswith("--disaggregation-mode: invalid choice: 'both'")
    assert errors[3] == "missing required flag --model-path (alias --model)"
    assert len(errors) == 4


@pytest.mark.sglang
def test_value_after_a_switch_is_explained(sglang_parser):
    errors = sglang_parser.check_argv(["--model-path", "/m", "--trust-remote-code", "true"])
    assert len(errors) == 1
    assert errors[0].startswith("unexpected value 'true' after --trust-remote-code: that flag is a switch")


@pytest.mark.sglang
def test_ambiguous_abbreviation_is_rejected(sglang_parser):
    errors = sglang_parser.check_argv(["--model-path", "/m", "--disaggregation-decode", "1"])
    assert len(errors) == 1
    assert errors[0].startswith("ambiguous option: --disaggregation-decode could match")


@pytest.mark.sglang
def test_abbreviations_pass_like_in_sglang_but_warn_and_fail_when_strict(sglang_parser):
    argv = ["--model-path", "/m", "--tp", "8", "--dp", "2"]
    result = sglang_parser.check(argv)
    assert result.errors == []
    assert (result.server_args.tp_size, result.server_args.dp_size) == (8, 2)
    assert [w.split()[0] for w in result.warnings] == ["--tp", "--dp"]
    strict = sglang_parser.check_argv(argv, allow_abbrev=False)
    assert strict == ["unknown flag --tp (did you mean --tp-size?)", "unknown flag --dp (did you mean --dp-size?)"]


@pytest.mark.sglang
def test_deprecated_flag_is_a_warning_not_an_error(sglang_parser):
    result = sglang_parser.check(["--model-path", "/m", "--dp-size", "2", "--enable-dp-attention"])
    assert result.errors == []
    assert any("--enable-dp-attention" in w and "--attn-dp-size" in w for w in result.warnings)


@pytest.mark.sglang
def test_startup_assertions_that_need_no_gpu(sglang_parser):
    errors = sglang_parser.check_argv(["--model-path", "/m", "--tp-size", "8", "--dp-size", "2", "--nnodes", "3",
                                       "--node-rank", "3", "--served-model-name", "llama:70b"])
    assert errors == [
        "--tp-size 8 x --pp-size 1 must be divisible by --nnodes 3",
        "--dp-size 2 with --nnodes 3: sglang does not support multi-node data-parallel replicas "
        "(use --attn-dp-size across nodes, or one replica per group)",
        "--node-rank 3 is outside 0..2 for --nnodes 3",
        "--nnodes 3 needs --dist-init-addr HOST:PORT (the rank-0 node's address)",
        "--served-model-name 'llama:70b': sglang forbids ':' there (reserved for model:adapter LoRA syntax)",
    ]


@pytest.mark.sglang
def test_json_model_override_args_must_be_a_json_object(sglang_parser):
    assert sglang_parser.check_argv(["--model-path", "/m", "--json-model-override-args", '{"a": 1}']) == []
    errors = sglang_parser.check_argv(["--model-path", "/m", "--json-model-override-args", "{a: 1}"])
    assert len(errors) == 1 and errors[0].startswith("--json-model-override-args is not valid JSON")
    assert sglang_parser.check_argv(["--model-path", "/m", "--json-model-override-args", "[1]"]) == [
        "--json-model-override-args must be a JSON object"]


@pytest.mark.sglang
def test_help_flag_is_refused_instead_of_exiting(sglang_parser):
    assert sglang_parser.check_argv(["--model-path", "/m", "--help"]) == [
        "-h/--help prints SGLang's help and exits: remove it from the engine args"]


@pytest.mark.sglang
def test_flag_facts_of_the_pinned_release(sglang_parser):
    """The facts docs/sglang-check.md gives the planner; fails loudly when the installed release differs."""
    assert sglang_check.sglang_version() == sglang_check.PINNED_VERSION, \
        f"facts are for sglang {sglang_check.PINNED_VERSION}, found {sglang_check.sglang_version()}: install the pin"
    info = sglang_parser.flag_info
    assert info("--tp-size")["names"] == ["--tp-size", "--tensor-parallel-size"]
    assert info("--tp") is None   # only an argparse abbreviation, not an alias
    assert info("--ep-size")["names"] == ["--ep-size", "--expert-parallel-size", "--ep"]
    assert info("--dp-size")["names"] == ["--dp-size", "--data-parallel-size"]
    assert info("--model-path")["names"] == ["--model-path", "--model"] and info("--model-path")["required"]
    assert info("--dist-init-addr")["names"] == ["--dist-init-addr", "--nccl-init-addr"]
    assert info("--disaggregation-mode")["choices"] == ["null", "prefill", "decode"]
    assert info("--disaggregation-bootstrap-port")["default"] == 8998
    assert info("--disaggregation-transfer-backend")["choices"] == [
        "mooncake", "nixl", "ascend", "fake", "mori", "mooncake_tcp"]
    assert info("--disaggregation-transfer-backend")["default"] == "mooncake"
    assert info("--enable-metrics")["kind"] == "switch"
    assert info("--enable-tf32-matmul")["kind"] == "on/off"
    assert info("--cuda-graph-bs-decode")["kind"] == "list (nargs=+)"
    assert (info("--host")["default"], info("--port")["default"]) == ("127.0.0.1", 30000)
    assert info("--mem-fraction-static")["type"] == "float"


@pytest.mark.sglang
def test_a_flag_given_twice_warns_because_the_last_value_wins(sglang_parser):
    result = sglang_parser.check(["--model-path", "/m", "--port", "30000", "--tp-size", "2", "--port", "31000"])
    assert result.errors == [] and result.server_args.port == 31000
    assert result.warnings == ["--port given twice (also as --port): SGLang keeps only the last value"]


@pytest.mark.sglang
def test_list_flags_take_values_after_one_flag(sglang_parser):
    result = sglang_parser.check(["--model-path", "/m", "--cuda-graph-bs-decode", "1", "2", "8",
                                  "--context-length", "32k"])
    assert result.errors == []
    assert result.server_args.cuda_graph_bs_decode == [1, 2, 8]
    assert result.server_args.context_length == 32000


@pytest.mark.sglang
def test_importing_sglang_leaves_the_environment_unchanged(sglang_parser):
    proc = _run_python("""
        import os, warnings
        before, filters = dict(os.environ), list(warnings.filters)
        from hpcserve.engines import sglang_check
        assert sglang_check.check_argv(["--model-path", "/m"]) == []
        print(sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)))
        print(warnings.filters == filters)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "True"]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_importing_hpcserve_does_not_import_sglang():
    proc = _run_python("""
        import sys
        import hpcserve, hpcserve.engines.base, hpcserve.engines.check, hpcserve.engines.sglang_check
        print(sorted(m for m in sys.modules if m == "sglang" or m.startswith(("sglang.", "torch"))))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_without_sglang_available_is_false_and_check_raises_importerror():
    # sys.modules[name] = None is how Python itself marks a module as not importable
    proc = _run_python("""
        import sys
        sys.modules["sglang"] = None
        from hpcserve.engines import sglang_check as s
        print(s.sglang_available(), s.sglang_available())
        print(s.sglang_unavailable_reason())
        try:
            s.check_argv(["--model-path", "/m"])
        except ImportError as exc:
            print("ImportError", exc)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "False False"
    assert "sglang" in lines[1] and lines[1].startswith("ModuleNotFoundError")
    assert lines[2].startswith("ImportError sglang is not importable here (ModuleNotFoundError")
