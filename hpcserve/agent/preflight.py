"""The doctor's node checks at the start of a job, before anything starts on the node.

Run as a child process (`python -m hpcserve.doctor --in-job`): the doctor sits above the agent in the package
layers, and a separate process keeps a hung check (a container that never starts) bounded by a timeout.
A doctor that itself breaks is logged and does not fail the job; a failed check does, with its lines.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from hpcserve.errors import HpcserveError

log = logging.getLogger("hpcserve.agent")
PREFLIGHT_TIMEOUT = 300.0    # container start plus model read; a slow shared filesystem is not a failure
EXIT_CHECKS_FAILED = 2


async def preflight(plan, run_dir: Path, rank: int, timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Raise HpcserveError naming every failed check of this node (one line each in failure.json)."""
    argv = [sys.executable, "-m", "hpcserve.doctor", "--plan", "-", "--run-dir", str(run_dir),
            "--node-rank", str(rank), "--in-job"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(plan.to_json()), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("preflight checks did not finish within %.0fs; starting anyway", timeout)
        return
    if proc.returncode == EXIT_CHECKS_FAILED:
        lines = out.decode(errors="replace").strip().splitlines()
        if lines:
            raise HpcserveError("preflight failed: " + " | ".join(lines))
    if proc.returncode != 0:
        log.warning("preflight checks could not run (exit %s): %s", proc.returncode,
                    err.decode(errors="replace").strip().splitlines()[-1:] or "")
        return
    log.info("preflight checks passed")
