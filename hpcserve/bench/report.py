"""PNG plots over one or more benchmark result directories (matplotlib, Agg backend, imported lazily).

  throughput_vs_tpot.png   output tok/s/GPU vs p50 TPOT, one line per run (or sweep point), points = levels
  throughput_vs_user.png   output tok/s/GPU vs tok/s/user, same lines
  ttft_vs_concurrency.png  p50 TTFT (p99 dashed) by concurrency level, same lines
  pareto.png               every valid level of every run, and per workload (ISL/OSL or dataset) the frontier
                           that no other level of that workload beats on both tok/s/GPU and tok/s/user
Axes fit the data (they do not start at 0); labels stay inside the figure. Invalid levels are never
plotted; they are listed under the plots with their reason. A run measured on the mock engine without a
timing model is marked in the legend: its numbers are not a model's.
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
        _ttft_plot(plt, series, out / "ttft_vs_concurrency.png", subtitle=subtitle, invalid=invalid),
        _pareto_plot(plt, series, out / "pareto.png", subtitle=subtitle, invalid=invalid),
        write_rollup(paths, out / ROLLUP_NAME),
    ]
    return written


MOCK_MARK = " (mock, no timing model)"


def _group(records: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(series_key(r), []).append(r)
    for name in [n for n, levels in groups.items() if any(r.get("timing_warning") for r in levels)]:
        groups[name + MOCK_MARK] = groups.pop(name)
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


def workload_of(rec: dict) -> str:
    """ISL/OSL (or the dataset) of a level: levels of different workloads are never on one frontier."""
    if rec.get("dataset"):
        return f"dataset {Path(str(rec['dataset'])).name}" + (f", OSL {rec['osl']}" if rec.get("osl") else "")
    return f"ISL {rec.get('isl')} / OSL {rec.get('osl')}"


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
        ax.margins(x=0.12, y=0.12)   # fitted to the data, with room for the level labels at the edges
        ax.legend(loc="best", fontsize=9, framealpha=0.85)
    bottom = 0.1
    if note:
        n_lines = note.count("\n") + 1
        bottom = 0.1 + 0.035 * n_lines
        fig.text(0.01, 0.01, note, fontsize=8, color="#aa0000", va="bottom", ha="left")
    fig.subplots_adjust(bottom=bottom, top=0.88, left=0.1, right=0.97)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)   # nothing cut at an edge
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
        _label_points(ax, pts, line.get_color())
    return _finish(plt, fig, ax, path, note, has_data)


def _label_points(ax, pts, color, fontsize: int = 8) -> None:
    """Level labels next to their points; points in the right third get theirs on the left, so that no
    label runs past the right edge of the figure."""
    xs = [p[0] for p in pts]
    for px, py, label in pts:
        right = len(set(xs)) > 1 and px > min(xs) + (max(xs) - min(xs)) * 0.66
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(-6, 5) if right else (6, 5),
                    ha="right" if right else "left", fontsize=fontsize, color=color)


def _ttft_plot(plt, series: dict[str, list[dict]], path: Path, *, subtitle: str, invalid: Sequence[dict]) -> Path:
    note = _invalid_note(invalid)
    fig, ax = _figure(plt, "Time to first token by load level", subtitle, note)
    ax.set_xlabel("Concurrency (requests in flight)")
    ax.set_ylabel("TTFT (ms): p50 solid, p99 dashed  -- lower is better")
    has_data = False
    for name, levels in series.items():
        pts = [(float(r.get("concurrency") or 0), _metric(r, "ttft_ms", "p50"), _metric(r, "ttft_ms", "p99"))
               for r in levels]
        pts = [p for p in pts if p[1] is not None]
        if not pts:
            continue
        has_data = True
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.8, label=name)
        p99 = [p for p in pts if p[2] is not None]
        ax.plot([p[0] for p in p99], [p[2] for p in p99], linestyle="--", linewidth=1.2, color=line.get_color())
    if has_data and len({p for levels in series.values() for p in (r.get("concurrency") for r in levels)}) > 2:
        ax.set_xscale("log", base=2)
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
        _label_points(ax, pts, sc.get_facecolor()[0], fontsize=7)
        every.extend((p[0], p[1]) for p in pts)
    fronts = frontiers(series)
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (workload, front) in enumerate(fronts.items()):
        label = "Pareto frontier" + (f" ({workload})" if len(fronts) > 1 else "")
        ax.plot([p[0] for p in front], [p[1] for p in front], color="black", linestyle=styles[i % len(styles)],
                linewidth=1.4, marker="D", markersize=5, markerfacecolor="none", label=label, zorder=3)
    return _finish(plt, fig, ax, path, note, bool(every))


def frontiers(series: dict[str, list[dict]]) -> dict[str, list[tuple[float, float]]]:
    """One Pareto frontier (tok/s/user, tok/s/GPU) per workload: a long-prompt run never hides a short one."""
    by_workload: dict[str, list[tuple[float, float]]] = {}
    for levels in series.values():
        for r in levels:
            x, y = _metric(r, "tok_per_s_per_user", None), _ygpu(r)
            if x is not None and y is not None:
                by_workload.setdefault(workload_of(r), []).append((x, y))
    return {w: pareto_frontier(pts) for w, pts in sorted(by_workload.items())}
