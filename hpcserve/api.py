"""The Python API the CLI is built on: load -> plan -> run dir (and, in later modules, submit/run)."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from hpcserve.backends.base import get_backend
from hpcserve.plan.build import plan
from hpcserve.plan.model import Plan
from hpcserve.recipe.load import LoadedRecipe, load_recipe, point_name
from hpcserve.render import write_run_dir
from hpcserve.rundir import atomic_write

if TYPE_CHECKING:
    from hpcserve.backends.base import Run


def load_plans(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
               python: str | None = None) -> list[tuple[LoadedRecipe, Plan]]:
    """Every sweep point of a recipe, validated and planned."""
    return [(lr, plan(lr.recipe, lr.point, python=python)) for lr in load_recipe(recipe, list(overrides), cluster)]


def write_plans(plans: list[tuple[LoadedRecipe, Plan]], out: Path) -> list[Path]:
    """One run dir, or for a sweep one sub-dir per point plus sweep.json."""
    out = Path(out)
    if len(plans) == 1 and not plans[0][0].point:
        return [write_run_dir(out, plans[0][0].raw, plans[0][1])]
    import orjson
    dirs = []
    for i, (lr, p) in enumerate(plans):
        dirs.append(write_run_dir(out / point_name(i, lr.point), lr.raw, p))
    out.mkdir(parents=True, exist_ok=True)
    index = [{"dir": d.name, "point": lr.point} for d, (lr, _) in zip(dirs, plans)]
    atomic_write(out / "sweep.json", orjson.dumps(index, option=orjson.OPT_INDENT_2) + b"\n")
    return dirs


def prepare_run(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
                run_dir: str | Path | None = None) -> list[tuple[Path, Plan]]:
    """Validate, plan and write the run dir(s) BEFORE anything is started or submitted."""
    from hpcserve.backends.base import new_run_dir
    plans = load_plans(recipe, overrides, cluster)
    out = Path(run_dir).resolve() if run_dir else new_run_dir(plans[0][1].name)
    dirs = list(zip(write_plans(plans, out), (p for _, p in plans)))
    lr, first = plans[0]
    if first.handover_seconds and get_backend(first.backend).time_limited:   # odd successor generations: other ports
        from hpcserve.agent.handover import ALT_PLAN
        [alt] = load_plans(recipe, list(overrides) + shifted_ports(lr.recipe, first, 1), cluster)
        atomic_write(out / ALT_PLAN, alt[1].to_json())
    return dirs


def shifted_ports(recipe, first: Plan, i: int) -> list[str]:
    """--set overrides giving copy ``i`` of a deployment its own ports (shards, successor generations):
    ports.base moved past the whole range the first copy uses, router.port + i."""
    used = [port for pr in first.processes if pr.kind in ("engine", "redis") for port in pr.ports.values()]
    span = (max(used, default=recipe.ports.base) - recipe.ports.base) // 100 * 100 + 100
    return [f"ports.base={recipe.ports.base + i * span}"] + ([f"router.port={recipe.router.port + i}"] if i else [])


def up(recipe: str | Path, overrides: list[str] = (), run_dir: str | Path | None = None, timeout: float | None = None):
    """Start a deployment on this machine; returns (Run, LocalBackend) once ready (raises on failure)."""
    from hpcserve.backends.local import LocalBackend
    from hpcserve.errors import HpcserveError
    [(lr, _)] = load_plans(recipe, overrides)[:1] or [(None, None)]
    extra = ["cluster.backend=local"]
    if lr.recipe.cluster.address == "auto":
        extra.append("cluster.address=127.0.0.1")
    [(d, plan)] = prepare_run(recipe, list(overrides) + extra, run_dir=run_dir)[:1]
    backend = LocalBackend()
    run = backend.submit(d, plan)
    try:
        run.wait_ready(timeout or plan.startup_timeout + 10, alive=backend.gone)
    except (HpcserveError, KeyboardInterrupt):
        backend.stop()
        raise
    return run, backend


def submit(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
           run_dir: str | Path | None = None, sbatch_args: list[str] = ()) -> list["Run"]:
    """Write the run dir(s), then sbatch. A sweep whose points each end by themselves (a benchmark stage) and
    share the cluster settings runs inside ONE allocation, point after point; otherwise one job per point."""
    from hpcserve.backends.base import Run
    from hpcserve.backends.slurm import SlurmBackend
    backend = SlurmBackend()
    dirs = prepare_run(recipe, overrides, cluster, run_dir)
    if len(dirs) > 1 and sweep_fits_one_allocation([p for _, p in dirs]):
        from hpcserve.render import render_sbatch
        top = dirs[0][0].parent
        nodes = max(p.num_nodes for _, p in dirs)
        first = dirs[0][1]
        alloc = first.model_copy(update={"slurm": first.slurm.model_copy(update={"nodes": nodes})})
        (top / "logs").mkdir(exist_ok=True)
        atomic_write(top / "job.sbatch", render_sbatch(alloc, points=[(d.name, p.num_nodes) for d, p in dirs]),
                     mode=0o755)
        run = backend.submit(top, alloc, extra_args=list(sbatch_args))
        for d, _ in dirs:
            Run(d, "slurm", job_id=run.job_id).save()
        return [run]
    return [backend.submit(d, plan, extra_args=list(sbatch_args)) for d, plan in dirs]


def sweep_fits_one_allocation(plans: list[Plan]) -> bool:
    """Points run back to back in one job (one `hpcserve node --sweep` agent per node, restarting only the
    processes that change) when each ends on its own (benchmark stage), all ask Slurm for the same thing apart
    from the node count, and share what lives for the whole sweep: the head node and its Redis, the address
    setting and the agents' Python."""
    if not all(any(p.kind == "bench" for p in plan.processes) for plan in plans):
        return False

    def lasting(plan: Plan) -> tuple:
        redis = tuple(p.model_dump_json() for p in plan.processes if p.kind == "redis")
        return (plan.slurm.model_copy(update={"nodes": 0}).model_dump_json(), plan.head_node, plan.address,
                plan.python, plan.redis_url, plan.redis_port, redis)
    return len({lasting(plan) for plan in plans}) == 1


def wait_ready(run: "Run", timeout: float) -> dict:
    """Block until the run's router is ready. A job that ended, or waits in the queue for something that
    will never happen (bad partition, account, QOS), raises with Slurm's reason and is cancelled."""
    from hpcserve.status import HOPELESS_PENDING, collect
    backend = get_backend(run.backend)

    def gone() -> str | None:
        [st] = collect([str(run.run_dir)])
        if st.phase == "blocked":
            backend.cancel(run.job_id)
            return f"job {run.job_id} can never start ({st.reason}); cancelled it. Fix the cluster profile"
        if st.slurm_state and st.slurm_state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") \
                and st.reason not in HOPELESS_PENDING:
            return f"job {run.job_id} ended: {st.phase} ({st.slurm_state})"
        return None
    return run.wait_ready(timeout, alive=gone, poll=1.0)


def cancel(run: "Run", wait: float = 60.0) -> str:
    """Graceful: SIGTERM to the job's agents (they drain, deregister, stop children); hard scancel after
    ``wait`` seconds. Returns the final Slurm state."""
    import time as _t

    from hpcserve.agent.handover import generations
    backend = get_backend(run.backend)
    atomic_write(run.run_dir / "cancel.json", '{"requested": true}\n')   # also stops a continuous chain
    gens = generations(run.run_dir)["jobs"]
    jobs = [run.job_id] + [gens[k] for k in sorted(gens, key=int)]
    live = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")
    for job, info in backend.status(jobs).items():
        if info.state in ("PENDING", "REQUEUED"):
            backend.cancel(job)
        elif info.state in ("RUNNING", "CONFIGURING"):
            backend.signal(job, "TERM")
    deadline = _t.monotonic() + wait
    while _t.monotonic() < deadline:
        states = backend.status(jobs)
        if all(i.state not in live for i in states.values()):
            return states[jobs[-1]].state
        _t.sleep(1.0)
    for job, info in backend.status(jobs).items():
        if info.state in live:
            backend.cancel(job)
    return backend.status(jobs)[jobs[-1]].state


def prepare_batch(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
                  run_dir: str | Path | None = None) -> tuple[Path, list[tuple[Path, Plan]]]:
    """Run dir(s) for an offline batch: one plan, or for batch.shards = N one plan per shard in
    RUN/shard-000i/ (own port range each: array tasks may share a host) plus RUN/job.sbatch for the array."""
    from hpcserve.backends.base import new_run_dir
    from hpcserve.errors import RecipeError
    from hpcserve.render import render_sbatch
    [lr] = load_recipe(recipe, list(overrides), cluster)[:1]
    if lr.recipe.batch is None:
        raise RecipeError(f"{recipe}: no batch section; give --input and --output")
    n = lr.recipe.batch.shards
    out = Path(run_dir).resolve() if run_dir else new_run_dir(lr.recipe.name)
    if n == 1:
        p = plan(lr.recipe)
        return out, [(write_run_dir(out, lr.raw, p), p)]
    first = plan(lr.recipe, shard=(0, n))
    shards = []
    for i in range(n):   # shard i: ports shifted by i*span, router port by i
        [lri] = load_recipe(recipe, list(overrides) + shifted_ports(lr.recipe, first, i), cluster)
        p = plan(lri.recipe, shard=(i, n))
        shards.append((write_run_dir(out / f"shard-{i:04d}", lri.raw, p), p))
    array_plan = shards[0][1].model_copy(update={"slurm": shards[0][1].slurm.model_copy(update={"array": n})})
    (out / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write(out / "job.sbatch", render_sbatch(array_plan), mode=0o755)
    atomic_write(out / "recipe.resolved.yaml", Path(shards[0][0] / "recipe.resolved.yaml").read_text())
    return out, shards


def _shard_outputs(recipe_batch) -> list[tuple[str, int, int]]:
    from hpcserve.batch import part_path
    n = recipe_batch.shards
    return [(recipe_batch.output if n == 1 else str(part_path(recipe_batch.output, i, n)), i, n) for i in range(n)]


def batch_complete(recipe_batch) -> bool:
    from hpcserve.batch import detect_complete
    return all(Path(out).exists() and detect_complete(recipe_batch.input, out, i, n)
               for out, i, n in _shard_outputs(recipe_batch))


def run_batch_job(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
                  run_dir: str | Path | None = None, wait: bool = True, timeout: float = 86400,
                  echo=print) -> str:
    """Offline batch on the recipe's backend. Finished output is detected before anything starts; shards
    run as a Slurm job array (local backend: one after another) and are merged in input order at the end."""
    import time as _t

    from hpcserve.backends.base import Run
    from hpcserve.batch import merge_shards
    from hpcserve.errors import BackendError
    [lr] = load_recipe(recipe, list(overrides), cluster)[:1]
    b = lr.recipe.batch
    if not Path(b.input).is_file():
        raise BackendError(f"batch input {b.input} does not exist; fix --input")
    if batch_complete(b):
        if b.shards > 1:
            merge_shards(b.input, b.output, b.shards)
        return f"output {b.output} already complete; nothing started"
    out, shards = prepare_batch(recipe, overrides, cluster, run_dir)
    echo(f"run dir {out}")
    if get_backend(lr.recipe.cluster.backend).attached:   # agents are this process's children: wait here
        from hpcserve.backends.local import LocalBackend
        for d, p in shards:
            backend = LocalBackend()
            backend.submit(d, p)
            deadline = _t.monotonic() + timeout
            while any(pr.poll() is None for pr in backend.procs) and _t.monotonic() < deadline:
                _t.sleep(0.5)
            codes = backend.stop(grace=30)
            fail = Run(d, "local").failure
            if fail or any(codes):
                raise BackendError(f"batch shard {d.name} failed: {fail['message'] if fail else codes}")
    else:
        from hpcserve.backends.slurm import SlurmBackend, query_jobs
        run = SlurmBackend().submit(out, shards[0][1])
        for i, (d, _) in enumerate(shards):
            if len(shards) > 1:
                Run(d, "slurm", job_id=f"{run.job_id}_{i}").save()
        echo(f"job {run.job_id}" + (f" (array of {len(shards)})" if len(shards) > 1 else ""))
        if not wait:
            return "submitted"
        deadline = _t.monotonic() + timeout
        live = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")
        while _t.monotonic() < deadline:
            ids = [f"{run.job_id}_{i}" for i in range(len(shards))] if len(shards) > 1 else [run.job_id]
            states = query_jobs(ids)
            if all(s.state not in live and s.state != "UNKNOWN" for s in states.values()):
                break
            _t.sleep(2)
    if not batch_complete(b):
        raise BackendError(f"batch ended with rows left; rerun the same command to resume (run dir {out})")
    if b.shards > 1:
        m = merge_shards(b.input, b.output, b.shards)
        return f"complete: {m.rows} rows ({m.errors} errors) merged into {b.output}"
    return f"complete: {b.output}"
