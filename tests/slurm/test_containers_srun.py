"""The pyxis runtime's step machinery on the real local Slurm, without pyxis itself (no enroot here): the
command the runtime builds, less its --container-* options, started and stopped by the agent's own
process code from inside an agent step. Shown: the stop signal reaches the engine as SIGTERM through srun
(which would kill the step on a SIGTERM of its own) and the engine's exit code comes back; a SIGKILLed
agent leaves no engine although the job goes on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from proc_util import pid_alive, wait_for
from slurm_util import requires_slurm, sbatch, scancel, squeue_state

pytestmark = [pytest.mark.slurm, requires_slurm]
REPO = Path(__file__).resolve().parents[2]

ENGINE = """
import os, signal, sys, time
def on_term(sig, frame):
    print("engine got SIGTERM, drained", flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], "w").write(str(os.getpid()))
print("engine up", flush=True)
time.sleep(120)
"""

AGENT = """
import asyncio, os, signal, sys
from pathlib import Path
from hpcserve.agent.procs import child_env, spawn, stop
from hpcserve.containers import EngineLaunch, get_runtime

run, mode = Path(sys.argv[1]), sys.argv[2]

async def main():
    runtime = get_runtime("pyxis")
    launch = EngineLaunch([sys.executable, str(run / "engine.py"), str(run / "engine.pid")], image="unused.sqsh",
                          workdir=str(run), name="engine-0", node_name=os.environ["SLURMD_NODENAME"])
    cmd = [a for a in runtime.command(launch) if not a.startswith(("--container-", "--no-container-"))]
    child = await spawn("engine-0", cmd, child_env(), run / "engine.log", run)
    while "engine up" not in (run / "engine.log").read_text():
        await asyncio.sleep(0.1)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = await stop(child, 30, runtime.stop_signal(launch))
    (run / "agent.out").write_text(f"engine exit {code}\\n")

asyncio.run(main())
"""


def _job(tmp_path: Path, mode: str) -> str:
    (tmp_path / "engine.py").write_text(ENGINE)
    (tmp_path / "agent.py").write_text(AGENT)
    script = (f"#!/bin/bash\nsrun --nodes=1 --ntasks=1 {sys.executable} {tmp_path}/agent.py {tmp_path} {mode}\n"
              "sleep 120\n")   # the job outlives the agent step: only the runtime may end the engine
    return sbatch("-p", "debug", "-N1", "-t", "5", "-o", str(tmp_path / "job.out"), "-D", str(tmp_path),
                  script=script)


def test_stop_signal_reaches_engine_through_srun_as_sigterm(tmp_path):
    job = _job(tmp_path, "drain")
    try:
        wait_for(lambda: (tmp_path / "agent.out").exists(), 90, "the agent stopped its engine")
        assert (tmp_path / "agent.out").read_text() == "engine exit 7\n"
        assert "engine got SIGTERM, drained" in (tmp_path / "engine.log").read_text()
    finally:
        scancel(job)


def test_sigkilled_agent_leaves_no_engine_step(tmp_path):
    job = _job(tmp_path, "kill")
    try:
        wait_for(lambda: (tmp_path / "engine.pid").exists() and (tmp_path / "engine.pid").read_text(), 90,
              "engine started")
        pid = int((tmp_path / "engine.pid").read_text())
        wait_for(lambda: not pid_alive(pid), 30, f"engine {pid} gone after the agent was SIGKILLed")
        assert squeue_state(job) == "RUNNING"   # the job lives on; the step ended because srun died
        assert "drained" not in (tmp_path / "engine.log").read_text()
    finally:
        scancel(job)
    assert os.path.exists(tmp_path / "engine.log")
