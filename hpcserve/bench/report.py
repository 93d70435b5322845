"""PNG plots over one or more benchmark result directories (matplotlib, Agg backend, imported lazily).

  throughput_vs_tpot.png   output tok/s/GPU vs p50 TPOT, one line per run (or sweep point), points = levels
  throughput_vs_user.png   output tok/s/GPU vs tok/s/user, same lines
  pareto.png               every valid level of every run, and the frontier that no other level beats on
                           both tok/s/GPU and tok/s/user
Invalid levels are never plotted; they are listed under the plots with their reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from hpcserve.bench.results import ROLLUP_NAME, load_levels, series_key, write_rollup
from hpcserve.bench.workload import BenchError

_NOTE_LINES = 4


def make_report(paths: Iterable[Path | str], out_dir: Path | str) -> list[Path]:
    """Draw the plots for every level JSON below ``paths`` into ``out_dir``; also write a combined
    rollup.csv there. Returns the files written."""
    paths = list(paths)
    records = load_levels(paths)
    if not records:
        raise BenchError(f"no level_c*.json results under {', '.join(map(str, paths))}; "
                         "pass the -o directory of a bench run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:
        raise BenchError("matplotlib is not installed; pip install 'hpcserve[bench]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = [r for r in records if r.get("valid")]
    invalid = [r for r in records if not r.get("valid")]
    series = _group(valid)
    subtitle = _workload_subtitle(records)
    written = [
        _line_plot(plt, series, out / "throughput_vs_tpot.png", x=("tpot_ms", "p50"),
                   xlabel="Median time per output token, p50 TPOT (ms)  -- lower is better",
                   title="Output throughput per GPU vs latency per token", subtitle=subtitle, invalid=invalid),
        _line_plot(plt, series, out / "throughput_vs_user.png", x=("tok_per_s_per_user", None),
                   xlabel="Output speed per user (tok/s/user = 1 / p50 TPOT)  -- higher is better",
                   title="Output throughput per GPU vs speed per user", subtitle=subtitle, invalid=invalid),
        _pareto_plot(plt, series, out / "pareto.png", subtitle=subtitle, invalid=invalid),
        write_rollup(paths, out / ROLLUP_NAME),
    ]
    return written


def _group(records: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(series_key(r), []).append(r)
    for levels in groups.values():
        levels.sort(key=lambda r: (r.get("concurrency", 0), r.get("request_rate") or 0))
    return groups


def _metric(rec: dict, name: str, stat: str | None) -> float | None:
    m = rec.get("metrics") or {}
    v = (m.get(name) or {}).get(stat) if stat else m.get(name)
    return float(v) if isinstance(v, (int, float)) else None


def _ygpu(rec: dict) -> float | None:
    return _metric(rec, "output_tok_per_s_per_gpu", None)


def _level_label(rec: dict) -> str:
    rate = rec.get("request_rate")
    return f"c={rec.get('concurrency')}" + (f"@{rate:g}/s" if rate else "")


def _workload_subtitle(records: Sequence[dict]) -> str:
    shapes = sorted({(r.get("isl"), r.get("osl"), r.get("dataset")) for r in records}, key=str)
    if len(shapes) != 1:
        return "mixed workloads"
    isl, osl, dataset = shapes[0]
    if dataset:
        return f"dataset {Path(str(dataset)).name}" + (f", OSL {osl}" if osl else "")
    return f"ISL {isl} / OSL {osl} tokens, random prompts"


def _invalid_note(invalid: Sequence[dict]) -> str:
    if not invalid:
        return ""
    lines = [f"Not plotted (invalid): {series_key(r)} {_level_label(r)}: {'; '.join(r.get('reasons') or [])}"
             for r in invalid[:_NOTE_LINES]]
    if len(invalid) > _NOTE_LINES:
        lines.append(f"... and {len(invalid) - _NOTE_LINES} more invalid levels (see rollup.csv)")
    return "\n".join(line if len(line) <= 150 else line[:147] + "..." for line in lines)


def _figure(plt, title: str, subtitle: str, note: str):
    extra = 0.22 * (note.count("\n") + 1) if note else 0.0
    fig, ax = plt.subplots(figsize=(9, 6 + extra))
    fig.suptitle(title, fontsize=13, fontweight="bold")
    ax.set_title(subtitle, fontsize=10, color="#444444")
    ax.set_ylabel("Output throughput per GPU (tok/s/GPU)")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _finish(plt, fig, ax, path: Path, note: str, has_data: bool) -> Path:
    if not has_data:
        ax.text(0.5, 0.5, "no valid levels to plot", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="#aa0000")
    else:
        ax.margins(x=0.08, y=0.08)   # room for the level labels at the edges
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=9, framealpha=0.85)
    bottom = 0.1
    if note:
        n_lines = note.count("\n") + 1
        bottom = 0.1 + 0.035 * n_lines
        fig.text(0.01, 0.01, note, fontsize=8, color="#aa0000", va="bottom", ha="left")
    fig.subplots_adjust(bottom=bottom, top=0.88, left=0.1, right=0.97)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line_plot(plt, series: dict[str, list[dict]], path: Path, *, x: tuple[str, str | None], xlabel: str,
               title: str, subtitle: str, invalid: Sequence[dict]) -> Path:
    note = _invalid_note(invalid)
    fig, ax = _figure(plt, title, subtitle, note)
    ax.set_xlabel(xlabel)
    has_data = False
    for name, levels in series.items():
        pts = [(_metric(r, *x), _ygpu(r), _level_label(r)) for r in levels]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        has_data = True
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.8, label=name)
        for px, py, label in pts:
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=8,
                        color=line.get_color())
    return _finish(plt, fig, ax, path, note, has_data)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated on (x, y), both maximised, sorted by x ascending."""
    best: list[tuple[float, float]] = []
    top_y = float("-inf")
    for px, py in sorted(points, key=lambda p: (-p[0], -p[1])):
        if py > top_y:
            best.append((px, py))
            top_y = py
    return sorted(best)


def _pareto_plot(plt, series: dict[str, list[dict]], path: Path, *, subtitle: str,
                 invalid: Sequence[dict]) -> Path:
    note = _invalid_note(invalid)
    fig, ax = _figure(plt, "Pareto frontier: throughput per GPU vs speed per user", subtitle, note)
    ax.set_xlabel("Output speed per user (tok/s/user = 1 / p50 TPOT)  -- higher is better")
    every: list[tuple[float, float]] = []
    for name, levels in series.items():
        pts = [(_metric(r, "tok_per_s_per_user", None), _ygpu(r), _level_label(r)) for r in levels]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=36, alpha=0.8, label=name)
        for px, py, label in pts:
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(6, 4), fontsize=7,
                        color=sc.get_facecolor()[0])
        every.extend((p[0], p[1]) for p in pts)
    if every:
        front = pareto_frontier(every)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="black", linestyle="--", linewidth=1.4,
                marker="D", markersize=5, markerfacecolor="none", label="Pareto frontier", zorder=3)
    return _finish(plt, fig, ax, path, note, bool(every))
