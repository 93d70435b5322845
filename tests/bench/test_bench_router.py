"""The router benchmarks still run end to end (numbers are not checked: only that every request was answered
and both CPU layouts were measured)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*argv: str) -> str:
    out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_router_core_bench_answers_every_request():
    out = run("perf/router_core.py", "--requests", "300", "--repeats", "2")
    assert re.search(r"non-streaming PD request, no sockets: best [0-9.]+ us CPU", out), out
    out = run("perf/router_core.py", "--requests", "300", "--repeats", "1", "--stream")
    assert "streaming PD request" in out


ROW = re.compile(r"^  (direct|hpcserve) +([0-9]+) .* ([0-9]+) +(?:[0-9]+|-) +-?[0-9.]+$", re.M)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the pinned layout needs 2 CPUs")
def test_router_bench_runs_both_layouts_without_errors():
    out = run("perf/router.py", "--requests", "300", "--rounds", "1", "--latency-requests", "20",
              "--skip-sglang", "--router-processes", "1")
    assert out.count("=== layout ") == 2 and "layout pinned" in out
    if shutil.which("cc") or shutil.which("gcc"):
        assert out.count("c harness") == 2, out
    rows = ROW.findall(out)
    assert len(rows) == 8, out  # 2 targets x 2 modes x 2 layouts
    assert all(errors == "0" for _, _, errors in rows), out


def test_router_bench_python_harness_still_runs():
    out = run("perf/router.py", "--requests", "200", "--rounds", "1", "--latency-requests", "10",
              "--skip-sglang", "--router-processes", "1", "--layouts", "shared", "--harness", "python")
    assert "python harness" in out
    rows = ROW.findall(out)
    assert len(rows) == 4 and all(errors == "0" for _, _, errors in rows), out
