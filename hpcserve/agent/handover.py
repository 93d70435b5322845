"""serve.continuous: serving past the wall-clock limit by handing the deployment over to a successor job.

Generation 0 is the run dir R itself; generation k > 0 lives in R/<R.name>-gen<k>/, a complete run dir of its
own (plan, job script, logs, Redis). Odd generations use the plan in R/plan.alt.json (ports shifted, router
port + 1) so that a successor that lands on its predecessor's host never collides with it.

The head agent of generation k, ``handover_seconds`` before its time limit, submits generation k+1 and waits
for its endpoint. The successor's head, once ready, writes R/endpoint.json (the one clients and `status`
read) and marks itself current in R/generations.json; then the predecessor drains and ends. A cancel
(R/cancel.json) stops the chain: no successor is submitted after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path

from hpcserve.rundir import RunPaths, atomic_write, read_json

log = logging.getLogger("hpcserve.agent")
CHECK_EVERY = 30.0       # seconds between asking Slurm for the time left (the limit can be changed)


def root_of(run_dir: Path) -> tuple[Path, int]:
    """(R, k): the run dir clients know, and which generation ``run_dir`` is."""
    mark = read_json(run_dir / RunPaths.GENERATION)
    return (Path(mark["root"]), int(mark["gen"])) if mark else (run_dir, 0)


def generation_dir(root: Path, gen: int) -> Path:
    return root if gen == 0 else root / f"{root.name}-gen{gen}"


def generations(root: Path) -> dict:
    """{"current": k, "jobs": {"k": job id}}; a run that never handed over has only generation 0."""
    return read_json(root / RunPaths.GENERATIONS) or {"current": 0, "jobs": {}}


def current_dir(root: Path) -> Path:
    """The run dir of the generation that serves now (``root`` itself unless a successor took over)."""
    return generation_dir(root, generations(root)["current"])


def _update(root: Path, jobs: dict[int, str] | None = None, **fields) -> None:
    info = generations(root)
    info["jobs"].update({str(gen): job for gen, job in (jobs or {}).items()})
    info.update(fields)
    atomic_write(root / RunPaths.GENERATIONS, json.dumps(info, indent=1) + "\n")


def prepare_successor(root: Path, gen: int) -> Path:
    """The successor's run dir: the plan for its port parity, the same job script and recipe."""
    d = generation_dir(root, gen)
    (d / "logs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / (RunPaths.PLAN_ALT if gen % 2 else RunPaths.PLAN), d / RunPaths.PLAN)
    for name in ("job.sbatch", "recipe.resolved.yaml"):
        if (root / name).exists():
            shutil.copy2(root / name, d / name)
    atomic_write(d / RunPaths.GENERATION, json.dumps({"root": str(root), "gen": gen}) + "\n")
    return d


def _sbatch_env() -> dict[str, str]:
    """The submitting environment minus this job's own Slurm variables (they would leak into the successor)."""
    keep = {"SLURM_CONF"}
    return {k: v for k, v in os.environ.items()
            if k in keep or not (k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "HPCSERVE_RUN_DIR")}


def submit_successor(root: Path, gen: int) -> str:
    from hpcserve.backends.slurm import SlurmBackend
    d = prepare_successor(root, gen)
    run = SlurmBackend().submit(d, None, env=_sbatch_env())
    _update(root, jobs={gen: run.job_id})
    return run.job_id


def promote(run_dir: Path, endpoint: dict) -> None:
    """Called by a generation's head once it is ready: it becomes the run's endpoint."""
    root, gen = root_of(run_dir)
    if gen == 0:
        return
    job = os.environ.get("SLURM_JOB_ID")
    atomic_write(root / RunPaths.ENDPOINT, json.dumps(endpoint | {"generation": gen, "job_id": job}, indent=1) + "\n")
    _update(root, current=gen, promoted_at=time.time())
    log.info("generation %d is now the run's endpoint (%s)", gen, endpoint.get("url"))


def cancelled(root: Path) -> bool:
    return (root / RunPaths.CANCEL).exists()


class Handover:
    """Head agent of a continuous deployment: returns (why) once the successor is ready; never otherwise."""

    def __init__(self, run_dir: Path, handover_seconds: int, job_id: str, poll: float = 1.0):
        self.root, self.gen = root_of(run_dir)
        self.lead, self.job_id, self.poll = handover_seconds, job_id, poll

    async def _wait_for_lead_time(self) -> None:
        from hpcserve.backends.slurm import time_left
        while True:
            try:
                left = await asyncio.to_thread(time_left, self.job_id)
            except Exception as e:   # noqa: BLE001 - slurmctld busy: ask again later
                log.warning("cannot read the time left from Slurm: %s", e)
                left = None
            if left is not None and left <= self.lead:
                return
            await asyncio.sleep(CHECK_EVERY if left is None else min(CHECK_EVERY, max(1.0, left - self.lead)))

    async def run(self) -> str:
        await self._wait_for_lead_time()
        if cancelled(self.root):
            log.info("run cancelled: no successor")
            await asyncio.Event().wait()
        nxt = self.gen + 1
        try:
            job = await asyncio.to_thread(submit_successor, self.root, nxt)
        except Exception as e:   # noqa: BLE001 - keep serving until the limit; say why there is no successor
            log.error("could not submit the successor (generation %d): %s", nxt, e)
            _update(self.root, error=f"generation {nxt}: {e}")
            await asyncio.Event().wait()
        if cancelled(self.root):   # a cancel raced the submission: it may not have seen the new job
            from hpcserve.backends.slurm import SlurmBackend
            await asyncio.to_thread(SlurmBackend.kill, job)
            await asyncio.Event().wait()
        log.info("submitted successor job %s (generation %d); serving until it is ready", job, nxt)
        d = generation_dir(self.root, nxt)
        while True:
            await asyncio.sleep(self.poll)
            if (d / RunPaths.ENDPOINT).exists():
                return f"handed over to job {job} (generation {nxt})"
            fail = read_json(d / RunPaths.FAILURE)
            if fail:
                log.error("successor job %s failed: %s; serving until the time limit", job, fail.get("message"))
                _update(self.root, error=f"generation {nxt}: {fail.get('message')}")
                await asyncio.Event().wait()
