"""`hpcserve bench` as a user meets it: an unreachable URL is one line and exit 2 (no table); the mock engine
without a timing model is said loudly and recorded with every level (the report marks the run); with a
timing model (recipes/local-demo-realistic.yaml) there is no warning."""

from __future__ import annotations

import json
import subprocess
import sys

from proc_util import REPO, free_port_block
from test_batch_mock import start_mock

from hpcserve.api import load_plans

PY = sys.executable


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hpcserve", "bench", *args], capture_output=True, text=True, timeout=120)


def test_unreachable_url_is_one_line_and_exit_2(tmp_path):
    port = free_port_block(1)
    res = bench(f"http://127.0.0.1:{port}", "--isl", "8", "--osl", "4", "-o", str(tmp_path / "b"))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(f"error: cannot reach http://127.0.0.1:{port} (")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "b").exists()


def test_mock_without_timing_model_is_warned_and_recorded(tmp_path):
    mock, url = start_mock("--mock-time-scale", "0")
    try:
        res = bench(url, "--isl", "8", "--osl", "4", "--concurrency", "1,2", "-o", str(tmp_path / "b"))
    finally:
        mock.stop()
    assert res.returncode == 0, res.stderr
    warnings = [x for x in res.stderr.splitlines() if x.startswith("WARNING: ")]
    assert len(warnings) == 2 and "mock without a timing model (time-scale 0)" in warnings[0]
    levels = [json.loads(p.read_text()) for p in sorted((tmp_path / "b").glob("level_c*.json"))]
    assert len(levels) == 2 and all("time-scale 0" in lv["timing_warning"] for lv in levels)


def test_mock_with_timing_model_is_not_warned(tmp_path):
    mock, url = start_mock("--mock-time-scale", "0.01", "--mock-decode-step-ms", "1")
    try:
        res = bench(url, "--isl", "8", "--osl", "4", "-o", str(tmp_path / "b"))
    finally:
        mock.stop()
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr
    [level] = [json.loads(p.read_text()) for p in (tmp_path / "b").glob("level_c*.json")]
    assert level["timing_warning"] is None


def test_realistic_demo_recipe_has_a_timing_model():
    [(_, plan)] = load_plans(REPO / "recipes/local-demo-realistic.yaml")
    argv = [p.argv for p in plan.processes if p.kind == "engine"][0]
    assert float(argv[argv.index("--mock-time-scale") + 1]) == 1.0
    assert float(argv[argv.index("--mock-decode-step-ms") + 1]) == 12.0
