"""Head-node process specs: Redis and the router (ours or sglang-router), one registry entry per router kind.

Secrets never enter argv: the node agent passes the Redis URL (with its generated password) to the router
through the HPCSERVE_REDIS_URL environment variable and writes redis.conf itself.
"""

from __future__ import annotations

from typing import Callable

from hpcserve.cmdline.batch import BatchArgs
from hpcserve.cmdline.router import RouterArgs
from hpcserve.plan.model import ProcessSpec, WorkerSpec
from hpcserve.recipe.schema import Recipe


def listen_host(recipe: Recipe) -> str:
    """Servers listen on the node's own address unless the recipe asks for every interface."""
    return "0.0.0.0" if recipe.serve.bind == "all" else "{addr}"


def redis_spec(head: int, port: int) -> ProcessSpec:
    return ProcessSpec(name="redis", kind="redis", node=head, argv=["{redis_server}", "{run_dir}/redis.conf"],
                       ports={"redis": port}, log="logs/redis.log", critical=True, restart=3)


def _hpcserve_router(recipe: Recipe, mode: str, workers: list[WorkerSpec], python: str) -> list[str]:
    """Our router's flags are hpcserve/cmdline/router.py's RouterArgs: written here, parsed by the router."""
    r = recipe.router
    args = RouterArgs(host=listen_host(recipe), port=r.port, mode=mode, run_id="{run_id}",
                      served_model_name=recipe.model.served_name or recipe.model.path)
    if mode == "pd":
        args.prefill_policy, args.decode_policy = r.prefill_policy, r.decode_policy
    else:
        args.policy = r.policy
    if r.api_key_env:
        args.api_key_env = r.api_key_env
    return [python, "-m", "hpcserve.router", *args.to_argv(), *r.args]


def _sglang_router(recipe: Recipe, mode: str, workers: list[WorkerSpec], python: str) -> list[str]:
    """sglang-router gets static worker URLs; node addresses are filled in at run time."""
    r = recipe.router
    argv = [python, "-m", "sglang_router.launch_router", "--host", listen_host(recipe), "--port", str(r.port)]
    if mode == "pd":
        argv += ["--pd-disaggregation", "--prefill-policy", r.prefill_policy, "--decode-policy", r.decode_policy]
        for w in workers:
            url = f"http://{{host:{w.nodes[0]}}}:{w.port}"
            argv += ["--prefill", url, str(w.bootstrap_port)] if w.role == "prefill" else ["--decode", url]
    else:
        argv += ["--policy", r.policy, "--worker-urls"]
        argv += [f"http://{{host:{w.nodes[0]}}}:{w.port}" for w in workers]
    return argv + list(r.args)


ROUTERS: dict[str, Callable[[Recipe, str, list[WorkerSpec], str], list[str]]] = {
    "hpcserve": _hpcserve_router,
    "sglang": _sglang_router,
}


def batch_spec(recipe: Recipe, head: int, python: str, shard: tuple[int, int], api: str) -> ProcessSpec:
    """The offline batch driver: sends every input row through the router on the head node (``api``: the
    stack's, so prompt rows go to /v1/completions where the head serves OpenAI routes only)."""
    b = recipe.batch
    index, count = shard
    args = BatchArgs(router=f"http://{{addr}}:{recipe.router.port}", input=b.input, output=b.output,
                     concurrency=b.concurrency, run_id="{run_id}", shard_index=index, num_shards=count,
                     **({"api": api} if api != "generate" else {}))  # the default stays off the command line
    argv = [python, "-m", "hpcserve.batch", *args.to_argv()]
    return ProcessSpec(name="batch", kind="batch", node=head, argv=argv, log="logs/batch.log", restart=0)


def bench_spec(recipe: Recipe, head: int, python: str, api: str, gpus: int, point: dict) -> ProcessSpec:
    """The benchmark stage: load levels against the router, results into RUN/bench/, then the job ends."""
    b = recipe.benchmark
    argv = [python, "-m", "hpcserve.bench", f"http://{{addr}}:{recipe.router.port}", "--isl", str(b.isl),
            "--osl", str(b.osl), "--api", api, "--concurrency", ",".join(map(str, b.concurrency)),
            "--warmup", str(b.warmup), "--gpus", str(max(gpus, 1)), "--label", _label(recipe.name, point),
            "-o", "{run_dir}/bench"]
    if b.num_prompts:
        argv += ["--num-prompts", str(b.num_prompts)]
    return ProcessSpec(name="bench", kind="bench", node=head, argv=argv, log="logs/bench.log", restart=0)


def _label(name: str, point: dict) -> str:
    """Results of sweep points are told apart by their values: name[key=value,...]."""
    return f"{name}[{','.join(f'{k}={v}' for k, v in point.items())}]" if point else name


def control_spec(recipe: Recipe, head: int, python: str, port: int, point: dict | None = None) -> ProcessSpec:
    """The control API (hpcserve.control): FastAPI next to the router, same bind and bearer key; it reads the
    Redis URL from the run dir's redis.json (mode 0600), never from argv. A sweep point's label is in argv so
    each point gets its own control API reading that point's run dir (the sweep agent keeps unchanged specs)."""
    argv = [python, "-m", "hpcserve.control", "--host", listen_host(recipe), "--port", str(port),
            "--run-dir", "{run_dir}", "--run-id", "{run_id}", "--router", f"http://{{addr}}:{recipe.router.port}"]
    if point:
        argv += ["--point", _label(recipe.name, point)]
    if recipe.router.api_key_env:
        argv += ["--api-key-env", recipe.router.api_key_env]
    return ProcessSpec(name="control", kind="control", node=head, argv=argv, ports={"control": port},
                       log="logs/control.log", restart=3)


def router_spec(recipe: Recipe, head: int, mode: str, workers: list[WorkerSpec], python: str, stack) -> ProcessSpec:
    """The head process that serves the endpoint, as the recipe's stack builds it (hpcserve/stacks/)."""
    argv = stack.head_argv(recipe, mode, workers, python, ROUTERS)
    return ProcessSpec(name="router", kind="router", node=head, argv=argv, ports={"router": recipe.router.port},
                       env=stack.head_env(recipe),
                       log="logs/router.log", critical=True, restart=3)
