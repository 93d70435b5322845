"""Start and stop mock engine processes: ``MockProcess.start([...flags...])`` (see engine_shell.launch)."""

from __future__ import annotations

from hpcserve.engine_shell.launch import EngineProcess


class MockProcess(EngineProcess):
    MODULE, DEFAULT_MODEL, NAME, LOG_PREFIX = "hpcserve.mock", "mock-model", "mock engine", "mock"
