"""Wiring: build the worker set, policies, dispatcher and app from the options and serve until SIGTERM."""

from __future__ import annotations

from hpcserve import aio

import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile

from hpcserve.errors import UsageError
from hpcserve.http import HttpServer
from hpcserve.router.app import RouterApp
from hpcserve.router.config import parse_args
from hpcserve.router.dispatch import Dispatcher
from hpcserve.router.follower import RegistryFollower
from hpcserve.router.health import HealthChecker
from hpcserve.router.limiter import Limiter
from hpcserve.router.metrics import RouterMetrics
from hpcserve.router.policies import make_policy
from hpcserve.router.workers import WorkerSet

log = logging.getLogger("hpcserve.router")


def build(ns) -> tuple[RouterApp, HealthChecker, RegistryFollower | None]:
    workers = WorkerSet(ns.mode, eject_after=ns.eject_after, readmit_after=ns.readmit_after,
                        connect_timeout=ns.connect_timeout)
    try:
        for url in ns.worker:
            workers.add_static("both", url)
        for url, port in ns.prefill:
            workers.add_static("prefill", url, port)
        for url in ns.decode:
            workers.add_static("decode", url)
    except ValueError as err:
        raise UsageError(str(err)) from None
    opts = dict(cache_threshold=ns.cache_threshold, balance_abs_threshold=ns.balance_abs_threshold,
                balance_rel_threshold=ns.balance_rel_threshold, max_tree_chars=ns.max_tree_chars,
                overlap_weight=ns.kv_overlap_weight, request_weight=ns.kv_request_weight,
                kv_block_size=ns.kv_block_size, kv_tokenizer=ns.kv_tokenizer)
    if ns.mode == "pd":
        policies = {"prefill": make_policy(ns.prefill_policy, **opts), "decode": make_policy(ns.decode_policy, **opts)}
    else:
        policies = {"both": make_policy(ns.policy, **opts)}
    workers.on_removed.append(lambda w: policies[w.role].forget(w) if w.role in policies else None)
    metrics = RouterMetrics(workers, getattr(ns, "share_dir", None))
    dispatcher = Dispatcher(workers, metrics, policies, first_byte_timeout=ns.first_byte_timeout,
                            idle_timeout=ns.idle_timeout, request_timeout=ns.request_timeout,
                            max_retries=ns.max_retries, max_redispatch=ns.max_redispatch)
    follower = RegistryFollower(workers, ns.redis_url, ns.run_id, rescan_interval=ns.registry_rescan) \
        if ns.redis_url else None
    app = RouterApp(mode=ns.mode, workers=workers, dispatcher=dispatcher, metrics=metrics,
                    limiter=Limiter(_share(ns.max_concurrency, ns.processes), _share(ns.queue_size, ns.processes),
                                    ns.queue_timeout), policies=policies,
                    api_key=ns.api_key, served_model_name=ns.served_model_name, follower=follower)
    dispatcher.on_finished = app.finished
    if follower is not None:
        follower.on_policies = lambda chosen: switch_policies(app, chosen, opts)
    if ns.health_timeout is not None and ns.health_timeout > ns.health_interval:
        log.info("--health-timeout %g capped at --health-interval %g", ns.health_timeout, ns.health_interval)
    health = HealthChecker(workers, interval=ns.health_interval, timeout=ns.health_timeout,
                           on_stalled=dispatcher.worker_stalled)
    return app, health, follower


def switch_policies(app: RouterApp, chosen: dict[str, str], opts: dict) -> None:
    """Follow operators' policy choices (role -> name, from the registry): new requests use the new policy,
    requests in flight finish where they are. Unknown roles or names are logged and skipped."""
    for role, name in chosen.items():
        old = app.policies.get(role)
        if old is None or old.name == name:
            continue
        try:
            new = make_policy(name, **opts)
        except ValueError as err:
            log.warning("ignoring the policy choice for %s: %s", role, err)
            continue
        app.policies[role] = new   # the dispatcher shares this dict
        for w in app.workers.all():
            old.forget(w)
        app.needs_key = any(p.needs_key for p in app.policies.values())
        log.info("%s policy switched from %s to %s", role, old.name, name)


def _share(total: int, processes: int) -> int:
    """One process's part of a limit that holds for all of them together (0 stays unlimited)."""
    return 0 if total == 0 else max(1, -(-total // processes))


async def _snapshots(app: RouterApp) -> None:
    while True:
        try:
            app.metrics.write_snapshot()
        except OSError as err:
            log.warning("cannot share metrics: %s", err)
        await asyncio.sleep(1.0)


async def serve(ns) -> None:
    app, health, follower = build(ns)
    # Startup objects never die: keep them out of the collector's way, and collect young objects less
    # often (the hot path allocates many short-lived ones, few of them in cycles).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    server = HttpServer(app.handle, max_body_bytes=ns.max_body_bytes)
    try:
        port = await server.start(ns.host, ns.port, reuse_port=ns.processes > 1)
    except OSError as err:
        raise UsageError(f"cannot listen on {ns.host}:{ns.port}: {err.strerror or err}") from None
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    tasks = [loop.create_task(health.run())]
    if follower is not None:
        tasks.append(loop.create_task(follower.run()))
    if app.metrics.share_dir is not None:
        tasks.append(loop.create_task(_snapshots(app)))
    log.info("router listening on http://%s:%d (%s mode, %d static workers)", ns.host, port, ns.mode,
             len(app.workers.workers))
    await stop
    log.info("router stopping: %d requests in flight", app.metrics.inflight)
    for _ in range(100):  # up to 10 s for in-flight requests
        if app.metrics.inflight == 0:
            break
        await asyncio.sleep(0.1)
    for t in tasks:
        t.cancel()
    await server.stop()
    app.workers.close()


def main(argv: list[str] | None = None) -> int:
    try:
        ns = parse_args(argv)
    except UsageError as err:
        print(f"hpcserve router: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.processes > 1:
        return run_processes(ns)
    return run_one(ns)


def run_one(ns) -> int:
    try:
        aio.run(serve(ns))
    except UsageError as err:
        print(f"hpcserve router: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def run_processes(ns) -> int:
    """Fork ``--processes`` routers on one SO_REUSEPORT port; the kernel spreads connections over them.
    The parent forwards SIGTERM/SIGINT and ends all when one dies (the node agent restarts the router)."""
    ns.share_dir = tempfile.mkdtemp(prefix="hpcserve-router-")
    children: list[int] = []
    try:
        for _ in range(ns.processes):
            pid = os.fork()
            if pid == 0:  # child: no event loop exists yet in the parent, so forking is safe
                code = 1
                try:
                    code = run_one(ns)
                finally:
                    os._exit(code)
            children.append(pid)

        def forward(sig: int, _frame: object) -> None:
            for child in children:
                try:
                    os.kill(child, sig)
                except ProcessLookupError:
                    pass

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        code = 0
        alive = set(children)
        while alive:
            pid, status = os.wait()
            alive.discard(pid)
            rc = os.waitstatus_to_exitcode(status)
            if rc != 0 and alive:
                log.error("router process %d exited with %d; stopping the others", pid, rc)
                forward(signal.SIGTERM, None)
            code = code or (rc if rc > 0 else 1 if rc < 0 else 0)
        return code
    finally:
        shutil.rmtree(ns.share_dir, ignore_errors=True)
