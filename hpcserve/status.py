"""Status of runs: Slurm state (one squeue call for all), the run dir's files, and Redis (workers, phase)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcserve import registry
from hpcserve.agent.handover import current_dir, root_of
from hpcserve.agent.redis_server import read_url
from hpcserve.backends.base import Run, get_backend
from hpcserve.errors import BackendError
from hpcserve.rundir import RunPaths, read_json

# Pending reasons that will never resolve by waiting: report them instead of sitting in the queue.
HOPELESS_PENDING = {"PartitionNodeLimit", "PartitionConfig", "ReqNodeNotAvail", "AccountNotAllowed",
                    "InvalidQOS", "InvalidAccount", "BadConstraints", "PartitionDown", "PartitionInactive",
                    "QOSMaxNodePerJobLimit", "AssocMaxNodesPerJobLimit", "JobHeldAdmin", "DependencyNeverSatisfied"}
FINAL_PHASE = {"TIMEOUT": "timeout", "CANCELLED": "cancelled", "FAILED": "failed", "NODE_FAIL": "failed",
               "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "timeout", "PREEMPTED": "preempted",
               "COMPLETED": "done"}


@dataclass
class RunStatus:
    run_dir: str | None
    job_id: str | None
    backend: str
    slurm_state: str | None = None
    reason: str = ""
    phase: str = "unknown"
    endpoint: str | None = None
    nodes: str = ""
    elapsed: str = ""
    workers: dict = field(default_factory=dict)        # role -> {state: count}
    worker_list: list = field(default_factory=list)
    failure: str | None = None
    progress: dict = field(default_factory=dict)       # batch_* fields the batch driver writes to Redis
    generation: int = 0                                # serve.continuous: which successor job serves now
    source: str = ""                                   # where the workers came from: control API or redis

    def to_dict(self) -> dict:
        return asdict(self)


def _redis_view(run_dir: Path, run_id: str) -> tuple[dict | None, list | None]:
    url = read_url(run_dir)
    if not url:
        return None, None
    import redis
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        raw = client.hgetall(registry.workers_key(run_id))
        hbs = client.mget([registry.heartbeat_key(run_id, k.decode()) for k in raw]) if raw else []
        status = {k.decode(): v.decode() for k, v in client.hgetall(registry.status_key(run_id)).items()}
        client.close()
    except Exception:   # noqa: BLE001 - Redis gone (job over): the run dir still tells the story
        return None, None
    workers = []
    for (k, v), hb in zip(raw.items(), hbs):
        rec = registry.WorkerRecord.from_json(v)
        workers.append(rec.model_dump() | {"state": rec.state if hb or rec.state == "dead" else "dead"})
    return status, sorted(workers, key=lambda w: w["id"])


def _control_view(run_dir: Path) -> tuple[dict | None, list | None]:
    """The head's control API, when it answers within 2 s: the phase and the workers (the registry's records
    with what the router knows); (None, None) otherwise, and the caller falls back to Redis."""
    from hpcserve.control.client import get_all
    try:
        run, workers = get_all(run_dir, ["/v1/run", "/v1/workers"], timeout=2.0)
    except Exception:   # noqa: BLE001 - head away, no control API in this run, no key here: Redis may answer
        return None, None
    return {"phase": run["phase"], **run.get("progress", {})}, workers


def _phase(st: RunStatus, run_dir: Path | None, redis_status: dict | None) -> str:
    s = st.slurm_state
    files = {n: (read_json(run_dir / n) if run_dir else None) for n in (RunPaths.FAILURE, RunPaths.STOPPED, RunPaths.CANCEL)}
    if files[RunPaths.FAILURE]:
        st.failure = files[RunPaths.FAILURE].get("message")
    if s in ("PENDING", "CONFIGURING", "REQUEUED"):
        return "blocked" if st.reason in HOPELESS_PENDING else "queued"
    if s in (None, "RUNNING", "COMPLETING", "SUSPENDED"):
        if st.failure:
            return "failed"
        if redis_status and redis_status.get("phase"):
            return redis_status["phase"]
        return "ready" if st.endpoint else ("starting" if s else "unknown")
    if st.failure and s != "TIMEOUT":
        return "failed"
    if files[RunPaths.CANCEL]:
        return "cancelled"
    if s == "COMPLETED" and files[RunPaths.STOPPED] and files[RunPaths.STOPPED].get("signal") == "SIGUSR2":
        return "timeout"      # the agents drained on the time-limit signal and ended before Slurm had to
    return FINAL_PHASE.get(s, s.lower() if s else "unknown")


def collect(targets: list[str]) -> list[RunStatus]:
    """Status for run dirs and/or job ids, with exactly one squeue call for all Slurm jobs."""
    runs: list[tuple[Run | None, str | None]] = []
    for t in targets:
        p = Path(t)
        if p.is_dir():
            run = Run.open(current_dir(p))   # a continuous run: the generation that serves now
            runs.append((run, run.job_id))
        elif t.replace("_", "").isdigit():
            runs.append((None, t))
        else:
            raise BackendError(f"{t}: neither a run directory nor a job id")
    job_ids = [j for _, j in runs if j]
    jobs = get_backend("slurm").status(job_ids) if job_ids else {}   # a job id is a Slurm job
    out = []
    for run, job_id in runs:
        info = jobs.get(job_id) if job_id else None
        run_dir = run.run_dir if run else (Path(info.workdir) if info and info.workdir else None)
        if run is None and run_dir is not None and not (run_dir / RunPaths.JOB).exists():
            run_dir = None
        st = RunStatus(run_dir=str(run_dir) if run_dir else None, job_id=job_id,
                       backend=run.backend if run else "slurm", generation=root_of(run_dir)[1] if run_dir else 0)
        if info:
            st.slurm_state, st.reason, st.nodes, st.elapsed = info.state, info.reason, info.nodes, info.elapsed
        redis_status = None
        if run_dir:
            ep = read_json(run_dir / RunPaths.ENDPOINT)
            st.endpoint = ep["url"] if ep else None
            if st.slurm_state in (None, "RUNNING", "COMPLETING"):
                # the registry's run id: a sweep point's is the sweep's (endpoint.json says which)
                redis_status, workers = _control_view(run_dir) if ep else (None, None)
                st.source = "control" if workers is not None else "redis"
                if workers is None:
                    redis_status, workers = _redis_view(run_dir, (ep or {}).get("run_id") or run_dir.name)
                st.progress = {k: v for k, v in (redis_status or {}).items() if k.startswith("batch_")}
                if workers is not None:
                    st.worker_list = workers
                    by_role: dict[str, Counter] = {}
                    for w in workers:
                        by_role.setdefault(w["role"], Counter())[w["state"]] += 1
                    st.workers = {r: dict(c) for r, c in sorted(by_role.items())}
        st.phase = _phase(st, run_dir, redis_status)
        out.append(st)
    return out
