"""Local backend: every node agent of the plan as a process on this machine (`hpcserve up`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcserve.backends.base import JobInfo, Run, register
from hpcserve.cmdline.agent import AgentArgs
from hpcserve.containers.lifecycle import die_with_parent
from hpcserve.rundir import RunPaths

# Seconds the other agents get to follow one that ended (they poll the run dir every 0.5 s and drain for up
# to 10 s) before they are stopped; docs/cli.md states the whole bound.
FOLLOW_SECONDS = 15.0


class LocalBackend:
    name = "local"
    time_limited = False
    attached = True

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def submit(self, run_dir: Path, plan, **kw) -> Run:
        # a rerun in the same run dir: the previous start's records would read as this one's (the local
        # backend's epoch is always the same), e.g. its failure would stop the new agents at once
        for name in (RunPaths.FAILURE, RunPaths.ENDPOINT, RunPaths.STOPPED, RunPaths.DONE):
            (RunPaths(run_dir) / name).unlink(missing_ok=True)
        for rank in range(plan.num_nodes):
            out = open(run_dir / "logs" / f"agent-node{rank}.out", "ab")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "hpcserve", "node", *AgentArgs(
                    plan=str(run_dir / RunPaths.PLAN), run_dir=str(run_dir), node_rank=rank).to_argv()],
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

    def wait(self, timeout: float, settle: float = FOLLOW_SECONDS, tick=None) -> bool:
        """Wait until every agent has exited (True) or ``timeout`` passed (False). Once one agent has ended,
        the others get ``settle`` seconds to follow (they watch the run dir); then ``stop()`` ends them, so a
        failed stage never leaves the rest of the deployment running. ``tick()`` runs about once a second."""
        deadline = time.monotonic() + timeout
        first_exit = None
        last_tick = 0.0
        while any(p.poll() is None for p in self.procs):
            now = time.monotonic()
            if first_exit is None and any(p.poll() is not None for p in self.procs):
                first_exit = now
            if now > deadline or (first_exit is not None and now - first_exit > settle):
                return False
            if tick is not None and now - last_tick >= 1.0:
                last_tick = now
                tick()
            time.sleep(0.2)
        return True

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
