"""Unit tests (synthetic data) for the benchmark's statistics, validity rules, workloads and result files."""

from __future__ import annotations

import asyncio
import csv
import math

import orjson
import pytest

from hpcserve.bench.results import ROLLUP_COLUMNS, load_levels, write_level, write_rollup
from hpcserve.bench.stats import RequestResult, level_metrics, percentile
from hpcserve.bench.validity import ValidityRules, check_level, read_restarts
from hpcserve.bench.workload import BenchError, load_dataset, random_requests, take


def ok(tokens: int, ttft: float, step: float, requested: int | None = None) -> RequestResult:
    """A successful request with evenly spaced tokens."""
    return RequestResult(ok=True, prompt_tokens=10, requested_tokens=requested, output_tokens=tokens, ttft=ttft,
                         e2e=ttft + step * (tokens - 1), itl=[step] * (tokens - 1))


def failed(msg: str = "HTTP 500: boom") -> RequestResult:
    return RequestResult(ok=False, error=msg)


def test_percentile_interpolates_like_numpy():
    xs = [5, 1, 4, 2, 3]
    assert percentile(xs, 50) == 3
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 5
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile([1, 2], 99) == pytest.approx(1.99)
    assert math.isnan(percentile([], 50))


def test_level_metrics_from_known_requests():
    # 4 requests of 11 tokens: TTFT 0.1 s, steps 0.02 s -> TPOT 0.02 s, e2e 0.3 s
    results = [ok(11, 0.1, 0.02) for _ in range(4)] + [failed()]
    m = level_metrics(results, concurrency=4, duration_s=2.0, gpus=2)
    assert (m.num_requests, m.completed, m.errors) == (5, 4, 1)
    assert m.error_rate == pytest.approx(0.2)
    assert m.output_tokens == 44 and m.input_tokens == 40
    assert m.req_per_s == pytest.approx(2.0)
    assert m.output_tok_per_s == pytest.approx(22.0)
    assert m.output_tok_per_s_per_gpu == pytest.approx(11.0)
    assert m.tok_per_s_per_user == pytest.approx(50.0)
    assert m.ttft_ms["p50"] == pytest.approx(100.0)
    assert m.itl_ms["p99"] == pytest.approx(20.0)
    assert m.tpot_ms["mean"] == pytest.approx(20.0)
    assert m.e2e_ms["p90"] == pytest.approx(300.0)
    d = m.to_dict()
    assert d["error_rate"] == pytest.approx(0.2)
    orjson.dumps(d)  # JSON-serialisable


def test_level_metrics_without_tokens_has_no_latency_numbers():
    m = level_metrics([RequestResult(ok=True, output_tokens=0, e2e=0.01)], concurrency=1, duration_s=0.01)
    assert m.output_tokens == 0 and m.tok_per_s_per_user is None
    assert m.ttft_ms["p50"] is None and m.tpot_ms["p50"] is None


def test_valid_level_has_no_reasons():
    assert check_level([ok(8, 0.1, 0.01, requested=8) for _ in range(20)], restarts_before=3,
                       restarts_after=3) == []


def test_zero_output_tokens_is_invalid():
    reasons = check_level([RequestResult(ok=True, output_tokens=0, requested_tokens=0) for _ in range(3)])
    assert reasons == ["zero output tokens from 3 completed requests"]


def test_error_rate_above_threshold_is_invalid_and_names_first_error():
    results = [ok(4, 0.1, 0.01)] * 18 + [failed("HTTP 404: not found")] * 2
    reasons = check_level(results, ValidityRules(max_error_rate=0.05))
    assert len(reasons) == 1 and "error rate 10% above 5%" in reasons[0] and "HTTP 404: not found" in reasons[0]
    assert check_level(results, ValidityRules(max_error_rate=0.10)) == []


def test_short_output_is_invalid_only_when_forced():
    results = [ok(16, 0.1, 0.01, requested=16)] * 3 + [ok(5, 0.1, 0.01, requested=16)]
    reasons = check_level(results)
    assert reasons == ["1 of 4 requests returned fewer tokens than requested (as few as 5 of 16)"]
    assert check_level(results, ValidityRules(require_full_output=False)) == []


def test_restart_during_level_is_invalid():
    reasons = check_level([ok(4, 0.1, 0.01)], restarts_before=1, restarts_after=2)
    assert reasons == ["worker restart during the level (registry restart count 1 -> 2)"]


def test_all_failed_is_invalid():
    reasons = check_level([failed("ClientConnectorError: refused")] * 4)
    assert reasons and reasons[0].startswith("error rate 100%")


def test_restart_counter_sync_and_async():
    async def async_count():
        return 7
    assert asyncio.run(read_restarts(lambda: 3)) == 3
    assert asyncio.run(read_restarts(async_count)) == 7
    assert asyncio.run(read_restarts(None)) is None


def test_random_prompts_exact_length_deterministic_and_distinct():
    a = random_requests(3, 50, 7, seed=1, tag="c1")
    b = random_requests(3, 50, 7, seed=1, tag="c1")
    assert a == b
    assert all(len(s.input_ids) == 50 and s.output_len == 7 for s in a)
    assert len({s.input_ids for s in a}) == 3
    assert random_requests(1, 50, 7, seed=1, tag="c8")[0] != a[0]
    assert random_requests(1, 50, 7, seed=2, tag="c1")[0] != a[0]
    assert all(1000 <= t < 30000 for s in a for t in s.input_ids)


def test_dataset_rows_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hello", "output_len": 3}\n\n{"input_ids": [1, 2, 3]}\n')
    rows = load_dataset(f, default_osl=9)
    assert rows[0].prompt == "hello" and rows[0].output_len == 3
    assert rows[1].input_ids == (1, 2, 3) and rows[1].output_len == 9 and rows[1].prompt_tokens == 3
    assert [r.output_len for r in take(rows, 5, offset=1)] == [9, 3, 9, 3, 9]
    with pytest.raises(BenchError, match=r"d.jsonl:3: no 'output_len'.*--osl"):
        load_dataset(f, default_osl=None)
    f.write_text('{"text": "x"}\n')
    with pytest.raises(BenchError, match=r":1: needs a non-empty 'prompt'"):
        load_dataset(f, default_osl=4)
    f.write_text("not json\n")
    with pytest.raises(BenchError, match=r":1: not valid JSON"):
        load_dataset(f, default_osl=4)


def _record(run: str, c: int, valid: bool = True, **metrics) -> dict:
    m = level_metrics([ok(11, 0.1, 0.02)] * c, concurrency=c, duration_s=1.0, gpus=1).to_dict()
    m.update(metrics)
    return {"run": run, "point": {"tp": 2}, "concurrency": c, "request_rate": None, "isl": 8, "osl": 11,
            "valid": valid, "reasons": [] if valid else ["zero output tokens from 1 completed requests"],
            "metrics": m}


def test_rollup_collects_levels_below_dirs_and_blanks_invalid_numbers(tmp_path):
    write_level(tmp_path / "p0", _record("a", 1))
    write_level(tmp_path / "p0", _record("a", 8))
    write_level(tmp_path / "p1" / "nested", _record("b", 1, valid=False))
    csv_path = write_rollup([tmp_path], tmp_path / "rollup.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ROLLUP_COLUMNS
    assert [(r["run"], r["concurrency"], r["valid"]) for r in rows] == [("a", "1", "true"), ("a", "8", "true"),
                                                                        ("b", "1", "false")]
    assert rows[0]["point"] == "tp=2"
    assert float(rows[1]["output_tok_per_s"]) == pytest.approx(88.0)
    assert rows[2]["output_tok_per_s"] == "" and rows[2]["ttft_ms_p50"] == ""
    assert rows[2]["reasons"].startswith("zero output tokens")
    assert len(load_levels([tmp_path / "p0"])) == 2


def test_rollup_rejects_missing_path(tmp_path):
    with pytest.raises(BenchError, match="neither a result directory"):
        load_levels([tmp_path / "nope"])
