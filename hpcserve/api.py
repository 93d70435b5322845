"""The Python API the CLI is built on: load -> plan -> run dir (and, in later modules, submit/run)."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING, Callable

from hpcserve.backends.base import get_backend
from hpcserve.plan.build import plan
from hpcserve.plan.model import Plan
from hpcserve.recipe.load import LoadedRecipe, load_recipe, point_name
from hpcserve.render import write_run_dir
from hpcserve.rundir import RunPaths, atomic_write

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
    atomic_write(out / RunPaths.SWEEP, orjson.dumps(index, option=orjson.OPT_INDENT_2) + b"\n")
    alloc = sweep_allocation([p for _, p in plans])
    if alloc is not None:   # what submit submits: the whole sweep, point after point, in one job
        (out / "logs").mkdir(exist_ok=True)
        atomic_write(out / RunPaths.SCRIPT, sweep_script(alloc, list(zip(dirs, (p for _, p in plans)))), mode=0o755)
    return dirs


def sweep_allocation(plans: list[Plan]) -> Plan | None:
    """The plan of the one allocation a sweep runs in (the most nodes any point needs), or None when its
    points are submitted as one job each (see sweep_fits_one_allocation)."""
    if len(plans) < 2 or not sweep_fits_one_allocation(plans):
        return None
    first = plans[0]
    nodes = max(p.num_nodes for p in plans)
    return first.model_copy(update={"slurm": first.slurm.model_copy(update={"nodes": nodes})})


def sweep_script(alloc: Plan, dirs: list[tuple[Path, Plan]]) -> str:
    from hpcserve.render import render_sbatch
    return render_sbatch(alloc, points=[(d.name, p.num_nodes) for d, p in dirs])


def prepare_run(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
                run_dir: str | Path | None = None,
                plans: list[tuple[LoadedRecipe, Plan]] | None = None) -> list[tuple[Path, Plan]]:
    """Validate, plan and write the run dir(s) BEFORE anything is started or submitted. ``plans``: what
    load_plans already gave for the same arguments (not loaded again)."""
    from hpcserve.backends.base import new_run_dir
    plans = plans or load_plans(recipe, overrides, cluster)
    out = Path(run_dir).resolve() if run_dir else new_run_dir(plans[0][1].name)
    dirs = list(zip(write_plans(plans, out), (p for _, p in plans)))
    lr, first = plans[0]
    if first.handover_seconds and get_backend(first.backend).time_limited:   # odd successor generations: other ports
        [alt] = load_plans(recipe, list(overrides) + shifted_ports(lr.recipe, first, 1), cluster)
        atomic_write(out / RunPaths.PLAN_ALT, alt[1].to_json())
    return dirs


def shifted_ports(recipe, first: Plan, i: int) -> list[str]:
    """--set overrides giving copy ``i`` of a deployment its own ports (shards, successor generations):
    ports.base moved past the whole range the first copy uses, router.port + i."""
    used = [port for pr in first.processes if pr.kind in ("engine", "redis") for port in pr.ports.values()]
    span = (max(used, default=recipe.ports.base) - recipe.ports.base) // 100 * 100 + 100
    return [f"ports.base={recipe.ports.base + i * span}"] + ([f"router.port={recipe.router.port + i}"] if i else [])


def up(recipe: str | Path, overrides: list[str] = (), run_dir: str | Path | None = None, timeout: float | None = None,
       tick=None):
    """Start a deployment on this machine; returns (Run, LocalBackend) once ready (raises on failure).
    ``tick(run_dir)`` runs while it waits (readiness progress)."""
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
        def alive() -> str | None:
            if tick is not None:
                tick(d)
            return backend.gone()
        run.wait_ready(timeout or plan.startup_timeout + 10, alive=alive)
    except (HpcserveError, KeyboardInterrupt):
        backend.stop()
        raise
    return run, backend


def submit(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
           run_dir: str | Path | None = None, sbatch_args: list[str] = (),
           on_note: Callable[[str], None] | None = None) -> list["Run"]:
    """Write the run dir(s), then sbatch. A sweep whose points each end by themselves (a benchmark stage) and
    share the cluster settings runs inside ONE allocation, point after point; otherwise one job per point.
    ``on_note`` gets what the user should know about how the recipe was resolved (e.g. --cluster overrides)."""
    from hpcserve.backends.base import Run
    from hpcserve.backends.slurm import SlurmBackend
    from hpcserve.errors import RecipeError
    backend = SlurmBackend()
    plans = load_plans(recipe, overrides, cluster)
    lr = plans[0][0]
    if on_note is not None:
        for line in lr.notes:
            on_note(line)
    if lr.recipe.cluster.backend != "slurm":
        raise RecipeError(f"{recipe} runs on the {lr.recipe.cluster.backend} backend (cluster.backend); run it "
                          f"with hpcserve up, or submit it with --cluster slurm/clusters/NAME.yaml")
    dirs = prepare_run(recipe, overrides, cluster, run_dir, plans)
    alloc = sweep_allocation([p for _, p in dirs])
    if alloc is not None:   # write_plans wrote the sweep's job.sbatch (render -o shows the same file)
        top = dirs[0][0].parent
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


def wait_ready(run: "Run", timeout: float, tick=None) -> dict:
    """Block until the run's router is ready. A job that ended, or waits in the queue for something that
    will never happen (bad partition, account, QOS), raises with Slurm's reason and is cancelled."""
    from hpcserve.status import HOPELESS_PENDING, collect
    backend = get_backend(run.backend)

    def gone() -> str | None:
        [st] = collect([str(run.run_dir)])
        if tick is not None:
            tick(run.run_dir, st)
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
    atomic_write(run.run_dir / RunPaths.CANCEL, '{"requested": true}\n')   # also stops a continuous chain
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
    atomic_write(out / RunPaths.SCRIPT, render_sbatch(array_plan), mode=0o755)
    atomic_write(out / RunPaths.RECIPE, Path(shards[0][0] / RunPaths.RECIPE).read_text())
    return out, shards


def _shard_outputs(recipe_batch) -> list[tuple[str, int, int]]:
    from hpcserve.batch import part_path
    n = recipe_batch.shards
    return [(recipe_batch.output if n == 1 else str(part_path(recipe_batch.output, i, n)), i, n) for i in range(n)]


def batch_outputs(recipe_batch) -> list[str]:
    """The files the batch driver(s) append rows to: the output, or one part per shard."""
    return [out for out, _, _ in _shard_outputs(recipe_batch)]


def batch_complete(recipe_batch) -> bool:
    from hpcserve.batch import detect_complete
    return all(Path(out).exists() and detect_complete(recipe_batch.input, out, i, n)
               for out, i, n in _shard_outputs(recipe_batch))


class BatchOutcome(str):
    """The verb's summary line, with the counts behind it (rows written, error rows among them)."""

    rows: int = 0
    errors: int = 0

    def __new__(cls, text: str, rows: int = 0, errors: int = 0) -> "BatchOutcome":
        out = super().__new__(cls, text)
        out.rows, out.errors = rows, errors
        return out


def finish_batch(b) -> BatchOutcome:
    """Write the output in input order (shards merged; an unsharded output, written in finish order,
    reordered in place) and say how many rows and error rows it holds."""
    from hpcserve.batch import merge, merge_shards
    m = merge_shards(b.input, b.output, b.shards) if b.shards > 1 else merge(b.input, b.output, [b.output])
    how = "merged" if b.shards > 1 else "in input order"
    return BatchOutcome(f"complete: {m.rows} rows ({m.errors} errors) {how} in {b.output}", m.rows, m.errors)


def run_batch_job(recipe: str | Path, overrides: list[str] = (), cluster: str | None = None,
                  run_dir: str | Path | None = None, wait: bool = True, timeout: float = 86400,
                  echo=print, tick=None) -> str:
    """Offline batch on the recipe's backend. Finished output is detected before anything starts; shards
    run as a Slurm job array (local backend: one after another); the output ends in input order.
    ``tick()`` runs about once a second while the batch runs (progress display). A failed stage raises naming
    it, once every process of the deployment has stopped (docs/cli.md gives the bound)."""
    from hpcserve.backends.base import Run
    from hpcserve.errors import BackendError
    [lr] = load_recipe(recipe, list(overrides), cluster)[:1]
    b = lr.recipe.batch
    if not Path(b.input).is_file():
        raise BackendError(f"batch input {b.input} does not exist; fix --input")
    if batch_complete(b):
        done = finish_batch(b)
        return BatchOutcome(f"{done}; it was complete already, nothing started", done.rows, done.errors)
    out, shards = prepare_batch(recipe, overrides, cluster, run_dir)
    echo(f"run dir {out}")
    if get_backend(lr.recipe.cluster.backend).attached:   # agents are this process's children: wait here
        from hpcserve.backends.local import LocalBackend
        for d, p in shards:
            backend = LocalBackend()
            backend.submit(d, p)
            try:   # one agent ending (stage done or failed) ends the rest within the backend's follow bound
                finished = backend.wait(timeout, tick=tick)
            finally:
                codes = backend.stop(grace=30)
            fail = Run(d, "local").failure
            if fail or any(codes):
                where = f"node {fail['node']}: {fail['message']}" if fail else f"agent exit codes {codes}"
                raise BackendError(f"batch failed on {where} (run dir {d})")
            if not finished:
                raise BackendError(f"batch still running after {timeout:.0f}s; stopped it. Rerun the same "
                                   f"command to resume, or raise --timeout (run dir {d})")
    else:
        from hpcserve.backends.slurm import SlurmBackend
        run = SlurmBackend().submit(out, shards[0][1])
        for i, (d, _) in enumerate(shards):
            if len(shards) > 1:
                Run(d, "slurm", job_id=f"{run.job_id}_{i}").save()
        echo(f"job {run.job_id}" + (f" (array of {len(shards)})" if len(shards) > 1 else ""))
        if not wait:
            return BatchOutcome("submitted")
        ids = [f"{run.job_id}_{i}" for i in range(len(shards))] if len(shards) > 1 else [run.job_id]
        wait_batch_jobs(ids, [d for d, _ in shards], timeout, tick=tick)
    if not batch_complete(b):
        raise BackendError(f"batch ended with rows left; rerun the same command to resume (run dir {out})")
    return finish_batch(b)


def wait_batch_jobs(ids: list[str], dirs: list[Path], timeout: float, tick=None, poll: float = 2.0) -> None:
    """Until every job (array task ``ids[i]`` runs in ``dirs[i]``) has ended. Slurm says so while it remembers
    the job; the run dir's own records (stopped.json, failure.json, done.json of that job) say so when it
    does not (no accounting: squeue forgets finished jobs after MinJobAge, sacct is off). Raises naming the
    failure when a job recorded one, and when ``timeout`` passes first."""
    import time as _t

    from hpcserve.backends.base import get_backend
    from hpcserve.errors import BackendError
    from hpcserve.rundir import RunPaths, read_json
    live = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "REQUEUE_HOLD")

    def recorded_end(job: str, d: Path) -> str | None:
        rp = RunPaths(d)
        stopped, fail, done = rp.read(RunPaths.STOPPED), rp.read(RunPaths.FAILURE), rp.read(RunPaths.DONE)
        if isinstance(fail, dict) and fail.get("job") == job:
            return "failed"
        if isinstance(stopped, dict) and stopped.get("job") == job and not stopped.get("requeued"):
            return "stopped"
        if isinstance(done, dict) and done.get("job") == job:
            return "done"
        return None

    deadline = _t.monotonic() + timeout
    last_tick = 0.0
    while True:
        states = get_backend("slurm").status(ids)
        ended = [s.state not in live and s.state != "UNKNOWN" or recorded_end(j, d) is not None
                 for (j, s), d in zip(((j, states[j]) for j in ids), dirs)]
        if all(ended):
            break
        if _t.monotonic() > deadline:
            raise BackendError(f"batch job {ids[0].split('_')[0]} still running after {timeout:.0f}s; it keeps "
                               f"running (hpcserve status / cancel {dirs[0].parent if len(dirs) > 1 else dirs[0]})")
        if tick is not None and _t.monotonic() - last_tick >= 1.0:
            last_tick = _t.monotonic()
            tick()
        _t.sleep(poll)
    for j, d in zip(ids, dirs):
        fail = read_json(RunPaths(d) / RunPaths.FAILURE)
        if isinstance(fail, dict) and fail.get("job") in (j, None):
            raise BackendError(f"batch failed on node {fail.get('node')}: {fail.get('message')} (run dir {d})")
