"""Backend protocol + registry, run directories, and the Run handle every backend returns."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from hpcserve.errors import BackendError
from hpcserve.rundir import RunPaths, read_json


def new_run_dir(name: str, root: str | Path | None = None) -> Path:
    root = Path(root or os.environ.get("HPCSERVE_RUNS_DIR") or "runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = root / f"{name}-{stamp}-{secrets.token_hex(2)}"
    return d.resolve()


@dataclass
class Run:
    """A submitted deployment: its run dir and, for Slurm, its job id."""

    run_dir: Path
    backend: str
    job_id: str | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> dict | None:
        return read_json(self.run_dir / RunPaths.ENDPOINT)

    @property
    def failure(self) -> dict | None:
        return read_json(self.run_dir / RunPaths.FAILURE)

    def wait_ready(self, timeout: float, alive: Callable[[], str | None] | None = None,
                   poll: float = 0.2) -> dict:
        """Block until endpoint.json appears; raise with the cause on failure or timeout.

        ``alive`` returns a reason string when the deployment is known to be gone (job ended, agent exited).
        """
        deadline = time.monotonic() + timeout
        while True:
            ep = self.endpoint
            if ep:
                return ep
            fail = self.failure
            if fail:
                raise BackendError(f"run failed on node {fail.get('node')}: {fail.get('message')}")
            gone = alive() if alive else None
            if gone:
                fail = self.failure
                raise BackendError(fail["message"] if fail else gone)
            if time.monotonic() > deadline:
                raise BackendError(f"not ready after {timeout:.0f}s; see {self.run_dir}/logs")
            time.sleep(poll)

    def save(self) -> None:
        from hpcserve.rundir import atomic_write
        atomic_write(self.run_dir / RunPaths.JOB, json.dumps(
            {"backend": self.backend, "job_id": self.job_id, "pids": self.pids}) + "\n")

    @classmethod
    def open(cls, run_dir: Path) -> "Run":
        info = read_json(Path(run_dir) / RunPaths.JOB)
        if info is None:
            raise BackendError(f"{run_dir} is not a run directory (no {RunPaths.JOB}); pass a run dir or job id")
        return cls(Path(run_dir).resolve(), info["backend"], info.get("job_id"), info.get("pids") or [])


@dataclass(frozen=True)
class JobInfo:
    """What a backend says about one job (a Slurm job id, or a local agent's pid)."""

    job_id: str
    state: str            # Slurm's spelling: PENDING RUNNING COMPLETED TIMEOUT CANCELLED FAILED, or UNKNOWN
    reason: str = ""
    nodes: str = ""
    elapsed: str = ""
    limit: str = ""
    workdir: str = ""


class Backend(Protocol):
    """Where the node agents of a plan run. Jobs are named by the ids ``submit`` put in the Run."""

    name: str
    time_limited: bool    # jobs end at a wall-clock limit (continuous serving hands over before it)
    attached: bool        # the agents are children of the calling process, which must wait for them

    def submit(self, run_dir: Path, plan, **kw) -> Run: ...

    def signal(self, job: str, sig: str = "TERM") -> None:
        """Graceful stop: the agents drain and exit 0."""

    def cancel(self, job: str) -> None:
        """Hard stop, now."""

    def status(self, jobs: list[str]) -> dict[str, JobInfo]:
        """Every job's state in one call (one squeue for any number of Slurm jobs)."""

    def time_left(self, job: str) -> float | None:
        """Seconds until the job's time limit, None when there is none or nobody says."""


BACKENDS: dict[str, Callable[[], Backend]] = {}


def register(name: str):
    def deco(factory):
        BACKENDS[name] = factory
        return factory
    return deco


def get_backend(name: str) -> Backend:
    from hpcserve.backends import local, slurm  # noqa: F401 (registers)
    try:
        return BACKENDS[name]()
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}") from None
