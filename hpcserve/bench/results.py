"""Result files: one JSON per level, and a rollup CSV with one row per run/point/level.

Level files are named ``level_c{C}[_r{rate}].json`` and may sit anywhere below a directory: a sweep can
write each point into its own subdirectory and one ``write_rollup(top)`` collects them all.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable

import orjson

from hpcserve.bench.workload import BenchError

LEVEL_GLOB = "level_c*.json"
ROLLUP_NAME = "rollup.csv"
SCHEMA_VERSION = 1

_ID_COLUMNS = ["run", "point", "api", "url", "isl", "osl", "dataset", "gpus", "concurrency", "request_rate",
               "num_requests", "completed", "errors", "valid", "reasons"]
_NUM_COLUMNS = ["duration_s", "req_per_s", "input_tok_per_s", "output_tok_per_s", "output_tok_per_s_per_gpu",
                "tok_per_s_per_user", "cached_token_ratio"]  # the last one empty unless the server reports it
_DIST_COLUMNS = [f"{m}_ms_{s}" for m in ("ttft", "itl", "tpot", "e2e") for s in ("mean", "p50", "p90", "p99")]
ROLLUP_COLUMNS = _ID_COLUMNS + _NUM_COLUMNS + _DIST_COLUMNS


def level_filename(concurrency: int, request_rate: float | None) -> str:
    rate = f"_r{request_rate:g}" if request_rate else ""
    return f"level_c{concurrency:04d}{rate}.json"


def write_level(out_dir: Path, record: dict) -> Path:
    """Write one level atomically (a crash never leaves half a file for the rollup to trip on)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / level_filename(record["concurrency"], record.get("request_rate"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)
    return path


def find_level_files(paths: Iterable[Path | str]) -> list[Path]:
    """Level JSONs given directly or found anywhere below the given directories, in a stable order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(LEVEL_GLOB)))
        else:
            raise BenchError(f"{p} is neither a result directory nor a level JSON; pass a bench output dir")
    return found


def load_levels(paths: Iterable[Path | str]) -> list[dict]:
    out = []
    for f in find_level_files(paths):
        try:
            rec = orjson.loads(f.read_bytes())
        except orjson.JSONDecodeError as e:
            raise BenchError(f"{f}: not a valid level JSON ({e}); delete it or rerun that level") from None
        rec["_path"] = str(f)
        out.append(rec)
    out.sort(key=lambda r: (series_key(r), r.get("concurrency", 0), r.get("request_rate") or 0))
    return out


def point_label(point: object) -> str:
    if not point:
        return ""
    if isinstance(point, dict):
        return ",".join(f"{k}={v}" for k, v in point.items())
    return str(point)


def series_key(rec: dict) -> str:
    """One line in the plots: a run, or one sweep point of a run."""
    run, point = str(rec.get("run") or ""), point_label(rec.get("point"))
    return f"{run} [{point}]" if run and point else (run or point or "run")


def rollup_row(rec: dict) -> dict:
    m = rec.get("metrics") or {}
    valid = bool(rec.get("valid"))
    row = {
        "run": rec.get("run", ""), "point": point_label(rec.get("point")), "api": rec.get("api", ""),
        "url": rec.get("url", ""), "isl": rec.get("isl", ""), "osl": rec.get("osl", ""),
        "dataset": rec.get("dataset") or "", "gpus": rec.get("gpus", ""), "concurrency": rec.get("concurrency"),
        "request_rate": rec.get("request_rate") or "", "num_requests": m.get("num_requests", ""),
        "completed": m.get("completed", ""), "errors": m.get("errors", ""), "valid": str(valid).lower(),
        "reasons": "; ".join(rec.get("reasons") or []),
    }
    # An invalid level is a failure, not a data point: its numbers stay in the JSON for diagnosis only.
    for col in _NUM_COLUMNS:
        row[col] = _fmt(m.get(col)) if valid else ""
    for col in _DIST_COLUMNS:
        metric, stat = col.rsplit("_ms_", 1)
        row[col] = _fmt((m.get(f"{metric}_ms") or {}).get(stat)) if valid else ""
    return row


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_rollup(paths: Iterable[Path | str], csv_path: Path) -> Path:
    """Collect every level below ``paths`` into one CSV (one row per run/point/level)."""
    records = load_levels(paths)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ROLLUP_COLUMNS)
        w.writeheader()
        for rec in records:
            w.writerow(rollup_row(rec))
    os.replace(tmp, csv_path)
    return csv_path
