"""Report plots over synthetic level files, and the pareto frontier."""

from __future__ import annotations

import csv

import pytest

from hpcserve.bench.report import make_report, pareto_frontier
from hpcserve.bench.results import write_level
from hpcserve.bench.workload import BenchError

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_level(run: str, c: int, gpus: int, speed: float, knee: float, valid: bool = True) -> dict:
    """A level from a toy capacity model: per-user speed falls as the batch grows past ``knee``."""
    per_user = speed / (1 + c / knee)
    tpot_ms = 1000.0 / per_user
    dist = lambda v: {"mean": v, "p50": v, "p90": v * 1.2, "p99": v * 1.5}  # noqa: E731
    return {
        "run": run, "point": None, "concurrency": c, "request_rate": None, "isl": 1024, "osl": 256, "gpus": gpus,
        "valid": valid, "reasons": [] if valid else ["error rate 40% above 5% (8 of 20 failed; first: HTTP 503)"],
        "metrics": {"num_requests": 4 * c, "completed": 4 * c, "errors": 0, "duration_s": 10.0,
                    "req_per_s": c * per_user / 256, "output_tok_per_s": c * per_user,
                    "output_tok_per_s_per_gpu": c * per_user / gpus, "tok_per_s_per_user": per_user,
                    "ttft_ms": dist(50 + 5 * c), "itl_ms": dist(tpot_ms), "tpot_ms": dist(tpot_ms),
                    "e2e_ms": dist(50 + 5 * c + 255 * tpot_ms)},
    }


def test_pareto_frontier_keeps_only_undominated_points():
    pts = [(10, 100), (20, 90), (15, 80), (30, 20), (5, 100), (25, 95)]
    assert pareto_frontier(pts) == [(10, 100), (25, 95), (30, 20)]
    assert pareto_frontier([]) == []


def test_report_writes_readable_pngs_and_a_combined_rollup(tmp_path):
    runs = {"agg-tp8": (8, 80.0, 24.0), "1p2d-tp8": (24, 110.0, 48.0)}
    for run, (gpus, speed, knee) in runs.items():
        for c in (1, 4, 16, 64, 256):
            write_level(tmp_path / run, synthetic_level(run, c, gpus, speed, knee, valid=not (run == "agg-tp8"
                                                                                               and c == 256)))
    out = tmp_path / "report"
    written = make_report([tmp_path / "agg-tp8", tmp_path / "1p2d-tp8"], out)
    names = sorted(p.name for p in written)
    assert names == ["pareto.png", "rollup.csv", "throughput_vs_tpot.png", "throughput_vs_user.png"]
    for p in written:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 20_000, p
    rows = list(csv.DictReader((out / "rollup.csv").open()))
    assert len(rows) == 10
    assert sum(r["valid"] == "false" for r in rows) == 1


def test_report_without_results_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no level_c"):
        make_report([tmp_path / "empty"], tmp_path / "out")
