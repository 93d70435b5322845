"""Wiring: build the worker set, policies, dispatcher and app from the options and serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from hpcserve.http import HttpServer
from hpcserve.router.app import RouterApp
from hpcserve.router.config import ConfigError, parse_args
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
        raise ConfigError(str(err)) from None
    opts = dict(cache_threshold=ns.cache_threshold, balance_abs_threshold=ns.balance_abs_threshold,
                balance_rel_threshold=ns.balance_rel_threshold, max_tree_chars=ns.max_tree_chars)
    if ns.mode == "pd":
        policies = {"prefill": make_policy(ns.prefill_policy, **opts), "decode": make_policy(ns.decode_policy, **opts)}
    else:
        policies = {"both": make_policy(ns.policy, **opts)}
    workers.on_removed.append(lambda w: policies[w.role].forget(w) if w.role in policies else None)
    metrics = RouterMetrics(workers)
    dispatcher = Dispatcher(workers, metrics, policies, first_byte_timeout=ns.first_byte_timeout,
                            idle_timeout=ns.idle_timeout, request_timeout=ns.request_timeout,
                            max_retries=ns.max_retries)
    follower = RegistryFollower(workers, ns.redis_url, ns.run_id, rescan_interval=ns.registry_rescan) \
        if ns.redis_url else None
    app = RouterApp(mode=ns.mode, workers=workers, dispatcher=dispatcher, metrics=metrics,
                    limiter=Limiter(ns.max_concurrency, ns.queue_size, ns.queue_timeout), policies=policies,
                    api_key=ns.api_key, served_model_name=ns.served_model_name, follower=follower)
    dispatcher.on_finished = app.finished
    health = HealthChecker(workers, interval=ns.health_interval, timeout=ns.health_timeout)
    return app, health, follower


async def serve(ns) -> None:
    app, health, follower = build(ns)
    server = HttpServer(app.handle, max_body_bytes=ns.max_body_bytes)
    try:
        port = await server.start(ns.host, ns.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {ns.host}:{ns.port}: {err.strerror or err}") from None
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    tasks = [loop.create_task(health.run())]
    if follower is not None:
        tasks.append(loop.create_task(follower.run()))
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
    except ConfigError as err:
        print(f"hpcserve router: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(serve(ns))
    except ConfigError as err:
        print(f"hpcserve router: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
