"""Shared fixtures. Helpers for Slurm live in slurm_util.py; for local processes in proc_util.py."""

from __future__ import annotations

import os
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
