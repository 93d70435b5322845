"""The run directory: the contract between the login node, the node agents, status and the benchmark.

One class names every file of a run (as submitit's JobPaths does), one writer writes them atomically, one
reader reads JSON with defined errors. Nothing else in the package spells a run-dir file name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hpcserve.errors import BackendError


class RunPaths:
    """Every path of one run directory. Written by: login node (render), agents (runtime), status (never)."""

    # written before submitting (render)
    RECIPE = "recipe.resolved.yaml"
    PLAN = "plan.json"
    PLAN_ALT = "plan.alt.json"           # odd generations of a continuous deployment: other ports
    SCRIPT = "job.sbatch"
    SWEEP = "sweep.json"                 # index of a sweep's point directories
    JOB = "job.json"                     # backend, job id, local pids
    # written while the job runs (agents)
    REDIS = "redis.json"                 # the run's Redis URL with its password: mode 0600
    ENDPOINT = "endpoint.json"           # the router's URL once ready
    FAILURE = "failure.json"             # the first failure: node and message
    STOPPED = "stopped.json"             # why the agents stopped (drain, handover, stage done)
    DONE = "done.json"                   # a stage (batch, bench) finished the job's work
    CANCEL = "cancel.json"               # `hpcserve cancel` asked for a stop (also ends a continuous chain)
    GENERATIONS = "generations.json"     # continuous serving: generation -> job id, the current one
    GENERATION = "generation.json"       # this directory's generation number
    LOGS = "logs"
    HOSTS = "hosts"                      # one node-<rank>.json per agent: the address it is reachable at
    BENCH = "bench"                      # benchmark stage results
    DOCTOR = "doctor"                    # hpcserve doctor: node-<rank>.json findings, head.json (reach check)
    DYNAMO = "dynamo"                    # stack dynamo: Dynamo's file discovery store (DYN_FILE_KV)

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunPaths({str(self.root)!r})"

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    def log(self, name: str) -> Path:
        return self.logs / name

    def host_file(self, rank: int) -> Path:
        return self.root / self.HOSTS / f"node-{rank}.json"

    def read(self, name: str) -> dict[str, Any] | None:
        return read_json(self.root / name)

    def write(self, name: str, data: Any, mode: int = 0o644) -> Path:
        """``data``: a dict/list (written as JSON), or text/bytes written as they are."""
        body = data if isinstance(data, (str, bytes)) else json.dumps(data, indent=1) + "\n"
        atomic_write(self.root / name, body, mode=mode)
        return self.root / name


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; None when it does not exist (not written yet) or is not valid JSON (a reader that
    raced an older non-atomic writer). Use ``load_json`` where a missing file is an error."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def load_json(path: str | Path, fix: str) -> Any:
    """The JSON in ``path``; a one-line BackendError naming ``fix`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except OSError:
        raise BackendError(f"{path} does not exist; {fix}") from None
    except ValueError as e:
        raise BackendError(f"{path} is not valid JSON ({e}); {fix}") from None


def atomic_write(path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write-then-rename in the same directory, fsynced: a reader sees the old file or the new one, never
    half of it, and a crash never leaves a half-written plan."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
