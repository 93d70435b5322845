"""Local backend: every node agent of the plan as a process on this machine (`hpcserve up`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcserve.backends.base import JobInfo, Run, register
from hpcserve.containers.lifecycle import die_with_parent


class LocalBackend:
    name = "local"
    time_limited = False
    attached = True

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def submit(self, run_dir: Path, plan, **kw) -> Run:
        for rank in range(plan.num_nodes):
            out = open(run_dir / "logs" / f"agent-node{rank}.out", "ab")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "hpcserve", "node", "--plan", str(run_dir / "plan.json"),
                 "--run-dir", str(run_dir), "--node-rank", str(rank)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir,
                start_new_session=True, preexec_fn=die_with_parent))
            out.close()
        run = Run(run_dir, self.name, pids=[p.pid for p in self.procs])
        run.save()
        return run

    def gone(self) -> str | None:
        """A reason when an agent has exited (the deployment is then incomplete)."""
        for rank, p in enumerate(self.procs):
            if p.poll() is not None:
                return f"node agent {rank} exited with code {p.returncode}; see logs/agent-node{rank}.log"
        return None

    def stop(self, grace: float = 30.0) -> list[int | None]:
        """SIGTERM every agent (they drain and stop their children), then SIGKILL what is left."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        return [p.returncode for p in self.procs]

    # The Backend protocol on job ids, which here are the agents' pids (Run.pids): usable from any process.
    @staticmethod
    def signal(job: str, sig: str = "TERM") -> None:
        try:
            os.kill(int(job), getattr(signal, f"SIG{sig}"))
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def cancel(job: str) -> None:
        try:
            os.killpg(int(job), signal.SIGKILL)   # the agent leads its session: its children go with it
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def status(jobs: list[str]) -> dict[str, JobInfo]:
        return {j: JobInfo(j, "RUNNING" if _alive(int(j)) else "COMPLETED") for j in jobs}

    @staticmethod
    def time_left(job: str) -> float | None:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return False


register("local")(LocalBackend)
