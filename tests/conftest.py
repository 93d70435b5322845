"""Shared fixtures. Helpers for Slurm live in slurm_util.py; for local processes in proc_util.py."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def chdir_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def deployment(tmp_path):
    """start(recipe=local-demo, extra=[--set ...]) -> (run, backend) of a local deployment on a free port
    block; every deployment is stopped at teardown."""
    from proc_util import demo_overrides

    from hpcserve.api import up
    started = []

    def start(recipe=REPO / "recipes/local-demo.yaml", extra=()):
        run, backend = up(recipe, demo_overrides(list(extra)), run_dir=tmp_path / f"run{len(started)}")
        started.append(backend)
        return run, backend
    yield start
    for b in started:
        b.stop()


def pytest_configure(config):
    os.environ.setdefault("HPCSERVE_TEST", "1")


# A skip because a component is missing (a module that does not import, a tool not installed) is a failure when
# HPCSERVE_REQUIRE_INSTALLED=1: tests/run.sh sets it after installing everything, so CI cannot go green by
# skipping what it was meant to run. Skips for facts of the machine (GPU tools present, too few CPUs) stay skips.
REQUIRE_INSTALLED = os.environ.get("HPCSERVE_REQUIRE_INSTALLED") == "1"
MISSING = re.compile(r"could not import|not importable|not installed|No module named|could not be installed", re.I)


def _fail_if_required_missing(report) -> None:
    if not (REQUIRE_INSTALLED and report.skipped):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING.search(reason):
        report.outcome = "failed"
        report.longrepr = f"required component missing (HPCSERVE_REQUIRE_INSTALLED=1; tests/run.sh installs it): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _fail_if_required_missing((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _fail_if_required_missing((yield).get_result())
