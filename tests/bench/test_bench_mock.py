"""The benchmark against real mock SGLang engines whose timing model is known.

Checks the measuring (not speed): at concurrency 1 the measured TTFT and ITL equal the mock's model times
within 10%; a 0-token run and an error-heavy run are invalid with their reason; report PNGs are written.
"""

from __future__ import annotations

import csv
from pathlib import Path

import orjson
import pytest

from hpcserve.bench import main as bench_main
from hpcserve.bench.runner import BenchConfig, run
from hpcserve.mock.launch import MockProcess

# Model times large enough that scheduling noise on a busy 2-core machine stays well under 10%.
PREFILL_BASE_MS, PREFILL_PER_TOKEN_MS = 40.0, 0.05
DECODE_STEP_MS, DECODE_PER_SEQ_MS = 25.0, 5.0
ISL, OSL = 400, 12


def start_mock(tmp_path: Path, *extra: str, time_scale: float = 1.0) -> tuple[MockProcess, str]:
    mock = MockProcess.start(
        ["--model-path", "m", "--mock-time-scale", str(time_scale), "--mock-prefill-base-ms", str(PREFILL_BASE_MS),
         "--mock-prefill-per-token-ms", str(PREFILL_PER_TOKEN_MS), "--mock-decode-step-ms", str(DECODE_STEP_MS),
         "--mock-decode-step-per-seq-ms", str(DECODE_PER_SEQ_MS), "--mock-max-running", "8", *extra],
        log_dir=tmp_path, wait="listen")
    return mock, mock.url


@pytest.fixture
def mock_url(tmp_path):
    proc, url = start_mock(tmp_path)
    try:
        yield url
    finally:
        proc.stop()


def test_measured_ttft_and_itl_match_the_mock_timing_model(mock_url, tmp_path):
    out = tmp_path / "c1"
    [level] = run(BenchConfig(url=mock_url, isl=ISL, osl=OSL, concurrency=[1], num_prompts=4, warmup=1,
                              gpus=2, run="mock"), out)
    assert level.valid, level.reasons
    m = level.metrics
    want_ttft = PREFILL_BASE_MS + PREFILL_PER_TOKEN_MS * ISL
    want_itl = DECODE_STEP_MS + DECODE_PER_SEQ_MS * 1
    assert m.ttft_ms["p50"] == pytest.approx(want_ttft, rel=0.10)
    assert m.itl_ms["p50"] == pytest.approx(want_itl, rel=0.10)
    assert m.tpot_ms["p50"] == pytest.approx(want_itl, rel=0.10)
    assert m.e2e_ms["p50"] == pytest.approx(want_ttft + (OSL - 1) * want_itl, rel=0.10)
    assert m.output_tokens == 4 * OSL and m.input_tokens == 4 * ISL and m.errors == 0
    assert m.output_tok_per_s_per_gpu == pytest.approx(m.output_tok_per_s / 2)
    rec = orjson.loads((out / "level_c0001.json").read_bytes())
    assert rec["valid"] is True and len(rec["requests"]) == 4
    assert all(r["output_tokens"] == OSL for r in rec["requests"])


def test_zero_token_run_is_invalid_with_reason(mock_url, tmp_path, capsys):
    rc = bench_main([mock_url, "--isl", "16", "--osl", "0", "--concurrency", "2", "--warmup", "0",
                     "-o", str(tmp_path / "zero")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "INVALID c=2: zero output tokens from 8 completed requests" in err
    [row] = list(csv.DictReader((tmp_path / "zero" / "rollup.csv").open()))
    assert row["valid"] == "false" and row["output_tok_per_s"] == "" and "zero output tokens" in row["reasons"]


def test_error_heavy_runs_are_invalid_with_reason(mock_url, tmp_path, capsys):
    rc = bench_main([mock_url + "/no/such/path", "--isl", "16", "--osl", "4", "--concurrency", "2",
                     "--warmup", "0", "-o", str(tmp_path / "bad-path")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "INVALID c=2: error rate 100% above 5% (8 of 8 failed; first: HTTP 404" in err


def test_partly_failing_dataset_run_is_invalid_with_reason(tmp_path, capsys):
    # 3 of 8 rows ask for more tokens than the mock's context length: those requests get HTTP 400
    rows = [{"input_ids": list(range(1000, 1010)), "output_len": 4}] * 5 + [{"prompt": "hi", "output_len": 500}] * 3
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    proc, url = start_mock(tmp_path, "--context-length", "64", time_scale=0.2)
    try:
        rc = bench_main([url, "--dataset", str(data), "--concurrency", "2", "--num-prompts", "8", "--warmup", "0",
                         "-o", str(tmp_path / "mixed")])
    finally:
        proc.stop()
    err = capsys.readouterr().err
    assert rc == 1
    assert "INVALID c=2: error rate 38% above 5% (3 of 8 failed; first: HTTP 400" in err
    rec = orjson.loads((tmp_path / "mixed" / "level_c0002.json").read_bytes())
    assert rec["metrics"]["completed"] == 5 and rec["metrics"]["output_tokens"] == 20
    assert "context length" in rec["reasons"][0]


def test_decode_only_engine_without_bootstrap_is_invalid(tmp_path, capsys):
    proc, url = start_mock(tmp_path, "--disaggregation-mode", "decode")
    try:
        rc = bench_main([url, "--isl", "16", "--osl", "4", "--concurrency", "2", "--warmup", "0",
                         "-o", str(tmp_path / "decode")])
    finally:
        proc.stop()
    err = capsys.readouterr().err
    assert rc == 1
    assert "INVALID c=2: error rate 100% above 5% (8 of 8 failed" in err


def test_sweep_of_levels_then_report_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the bench extra; CI must install it for this test to run
    proc, mock_url = start_mock(tmp_path, time_scale=0.5)  # half the model times: a shorter test
    try:
        _two_runs(mock_url, tmp_path, capsys)
    finally:
        proc.stop()
    rc = bench_main(["report", str(tmp_path / "mock-a"), str(tmp_path / "mock-b"), "-o", str(tmp_path / "rep")])
    assert rc == 0
    for name in ("throughput_vs_tpot.png", "throughput_vs_user.png", "pareto.png"):
        assert (tmp_path / "rep" / name).read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((tmp_path / "rep" / "rollup.csv").open()))
    assert [(r["run"], r["concurrency"]) for r in rows] == [("mock-a", "1"), ("mock-a", "4"), ("mock-b", "2"),
                                                            ("mock-b", "8")]
    # 8 sequences per decode step cost 25+5*8 ms against 25+5*1 at c=1: each user decodes about 2x slower
    per_user = {int(r["concurrency"]): float(r["tok_per_s_per_user"]) for r in rows}
    assert per_user[8] < per_user[1]


def _two_runs(mock_url: str, tmp_path: Path, capsys) -> None:
    for label, cs in (("mock-a", "1,4"), ("mock-b", "2,8")):
        rc = bench_main([mock_url, "--isl", "64", "--osl", "8", "--concurrency", cs, "--warmup", "1",
                         "--num-prompts", "8", "--gpus", "1", "--label", label, "-o", str(tmp_path / label)])
        assert rc == 0, capsys.readouterr().err
