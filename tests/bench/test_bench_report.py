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
    assert names == ["pareto.png", "rollup.csv", "throughput_vs_tpot.png", "throughput_vs_user.png",
                     "ttft_vs_concurrency.png"]
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


def _figures(monkeypatch, tmp_path, records: list[dict]) -> dict[str, object]:
    """Make the report and keep its figures open (title -> figure) to look at what was drawn."""
    import matplotlib.pyplot as plt
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    for i, rec in enumerate(records):
        write_level(tmp_path / "res" / f"{rec['run']}-{i}", rec)
    make_report([tmp_path / "res"], tmp_path / "report")
    figs = {plt.figure(n)._suptitle.get_text(): plt.figure(n) for n in plt.get_fignums()}
    monkeypatch.undo()
    return figs


def test_ttft_plot_axes_fit_the_data_and_labels_stay_inside(monkeypatch, tmp_path):
    recs = [synthetic_level("agg", c, 8, 80.0, 24.0) for c in (1, 4, 16, 32)]
    for r in recs:   # throughput far from 0: an axis from 0 would leave the data a sliver at the edge
        r["metrics"]["output_tok_per_s_per_gpu"] += 5000
    figs = _figures(monkeypatch, tmp_path, recs)
    ttft = figs["Time to first token by load level"]
    [ax] = ttft.axes
    p50, p99 = ax.lines[0], ax.lines[1]
    assert list(p50.get_xdata()) == [1, 4, 16, 32]
    assert list(p50.get_ydata()) == [55, 70, 130, 210] and list(p99.get_ydata()) == [82.5, 105, 195, 315]
    tput = figs["Output throughput per GPU vs latency per token"]
    assert tput.axes[0].get_ylim()[0] > 4000
    for fig in figs.values():
        fig.canvas.draw()
        box = fig.bbox
        for text in fig.axes[0].texts:
            ext = text.get_window_extent()
            assert box.x0 <= ext.x0 and ext.x1 <= box.x1, f"label {text.get_text()!r} cut at the edge"


def test_one_frontier_per_workload_and_mock_runs_marked(monkeypatch, tmp_path):
    from hpcserve.bench.report import MOCK_MARK, _group, frontiers
    short = [synthetic_level("short", c, 8, 80.0, 24.0) for c in (1, 8, 64)]
    long_ = [synthetic_level("long", c, 8, 20.0, 8.0) | {"isl": 8192, "osl": 1024} for c in (1, 8, 64)]
    long_[0]["timing_warning"] = "the engine is the mock without a timing model"
    fronts = frontiers(_group(short + long_))
    assert sorted(fronts) == ["ISL 1024 / OSL 256", "ISL 8192 / OSL 1024"]
    assert len(fronts["ISL 8192 / OSL 1024"]) == 3    # not hidden behind the faster short-prompt levels
    figs = _figures(monkeypatch, tmp_path, short + long_)
    labels = [t.get_text() for t in figs["Pareto frontier: throughput per GPU vs speed per user"].axes[0]
              .get_legend().get_texts()]
    assert "long" + MOCK_MARK in labels and "short" in labels
    assert "Pareto frontier (ISL 1024 / OSL 256)" in labels and "Pareto frontier (ISL 8192 / OSL 1024)" in labels
