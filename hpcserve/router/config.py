"""Command-line options of ``python -m hpcserve.router`` and their checks (one-line errors, no tracebacks)."""

from __future__ import annotations

import argparse
import os

from hpcserve.router.policies import POLICIES


class ConfigError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpcserve.router",
                                description="hpcserve head-node router for SGLang workers (PD or aggregated).")
    a = p.add_argument
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    a("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    a("--mode", choices=["pd", "aggregated"], default=None,
      help="pd: prefill+decode pairs; aggregated: one worker per request (default: pd if --prefill/--decode given)")
    g = p.add_argument_group("worker sources")
    g.add_argument("--redis-url", default=os.environ.get("HPCSERVE_REDIS_URL"),
                   help="follow the worker registry in this Redis (default: $HPCSERVE_REDIS_URL)")
    g.add_argument("--run-id", default=os.environ.get("HPCSERVE_RUN_ID"), help="registry run id")
    g.add_argument("--worker", action="append", default=[], metavar="URL", help="static aggregated worker")
    g.add_argument("--prefill", action="append", nargs="+", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                   help="static prefill worker and its bootstrap port (default port 8998)")
    g.add_argument("--decode", action="append", default=[], metavar="URL", help="static decode worker")
    g.add_argument("--registry-rescan", type=float, default=2.0, help="seconds between full registry rescans")
    g = p.add_argument_group("policies")
    names = sorted(POLICIES)
    g.add_argument("--policy", choices=names, default="cache_aware", help="aggregated mode policy")
    g.add_argument("--prefill-policy", choices=names, default="cache_aware", help="PD prefill policy")
    g.add_argument("--decode-policy", choices=names, default="least_load", help="PD decode policy")
    g.add_argument("--cache-threshold", type=float, default=0.5,
                   help="cache_aware: minimum matched fraction of the prompt to follow the match")
    g.add_argument("--balance-abs-threshold", type=int, default=32,
                   help="cache_aware: in-flight difference (max-min) above which load wins over cache")
    g.add_argument("--balance-rel-threshold", type=float, default=1.5,
                   help="cache_aware: ... and max > min * this")
    g.add_argument("--max-tree-chars", type=int, default=8_000_000, help="cache_aware: prefix tree size bound")
    g.add_argument("--kv-overlap-weight", type=float, default=4.0,
                   help="kv_aware: weight of blocks to prefill against in-flight uncached blocks (docs/kv-routing.md)")
    g.add_argument("--kv-request-weight", type=float, default=64.0,
                   help="kv_aware: cost of each in-flight request on a worker, in blocks (docs/kv-routing.md)")
    g.add_argument("--kv-block-size", type=int, default=None,
                   help="kv_aware: tokens per KV block (default: the workers' /server_info kv_events)")
    g.add_argument("--kv-tokenizer", default=None, metavar="TOKENIZER_JSON",
                   help="kv_aware: the model's tokenizer.json (default: the mock's byte tokenizer)")
    g = p.add_argument_group("limits and auth")
    g.add_argument("--api-key-env", metavar="NAME", help="require 'Authorization: Bearer $NAME'")
    g.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    g.add_argument("--max-concurrency", type=int, default=0, help="requests in flight at once (0: no limit)")
    g.add_argument("--queue-size", type=int, default=256, help="requests waiting beyond that (more: 429)")
    g.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a queued request waits (then 503)")
    g = p.add_argument_group("timeouts and health")
    g.add_argument("--request-timeout", type=float, default=1800.0, help="whole upstream request, seconds")
    g.add_argument("--connect-timeout", type=float, default=5.0)
    g.add_argument("--first-byte-timeout", type=float, default=None, help="default: --request-timeout")
    g.add_argument("--idle-timeout", type=float, default=600.0, help="longest silence inside a response")
    g.add_argument("--max-retries", type=int, default=2, help="other workers tried after a connect failure")
    g.add_argument("--max-redispatch", type=int, default=2,
                   help="times a request is sent again to another worker after its worker died or stalled "
                        "before the client got a byte (0: never)")
    g.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between probe rounds; a stalled worker is ejected within two of them")
    g.add_argument("--health-timeout", type=float, default=None,
                   help="probe timeout (default and maximum: --health-interval); no answer in time = stalled")
    g.add_argument("--eject-after", type=int, default=3, help="consecutive failures that eject a worker")
    g.add_argument("--readmit-after", type=int, default=2, help="consecutive probe successes that readmit it")
    g = p.add_argument_group("processes")
    g.add_argument("--processes", type=int, default=1,
                   help="router processes sharing the port (SO_REUSEPORT); each keeps its own policy state, "
                        "limits are split between them, /metrics sums them all")
    g = p.add_argument_group("misc")
    g.add_argument("--served-model-name", help="model id answered by /v1/models (default: ask a worker)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ns = build_parser().parse_args(argv)
    prefills = []
    for item in ns.prefill:
        if len(item) > 2:
            raise ConfigError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(item)}")
        port = 8998
        if len(item) == 2:
            if not item[1].isdigit() or not 0 < int(item[1]) < 65536:
                raise ConfigError(f"--prefill {item[0]}: bootstrap port {item[1]!r} must be a number in 1-65535")
            port = int(item[1])
        prefills.append((item[0], port))
    ns.prefill = prefills
    if ns.mode is None:
        ns.mode = "pd" if (prefills or ns.decode) else "aggregated"
    if ns.mode == "pd" and ns.worker:
        raise ConfigError("--worker is for --mode aggregated; in pd mode use --prefill URL PORT and --decode URL")
    if ns.mode == "aggregated" and (prefills or ns.decode):
        raise ConfigError("--prefill/--decode need --mode pd; aggregated workers are given with --worker URL")
    if bool(ns.redis_url) != bool(ns.run_id):
        raise ConfigError("--redis-url and --run-id go together (or set HPCSERVE_REDIS_URL and HPCSERVE_RUN_ID)")
    if not (ns.redis_url or ns.worker or prefills or ns.decode):
        raise ConfigError("no workers: give --redis-url URL --run-id ID, or static --worker / --prefill / --decode")
    ns.api_key = None
    if ns.api_key_env:
        ns.api_key = os.environ.get(ns.api_key_env)
        if not ns.api_key:
            raise ConfigError(f"--api-key-env {ns.api_key_env}: that environment variable is empty or unset")
    for name in ("max_body_bytes", "queue_size", "max_concurrency", "max_retries", "max_redispatch"):
        if getattr(ns, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("request_timeout", "connect_timeout", "idle_timeout", "health_interval", "health_timeout"):
        if getattr(ns, name) is not None and getattr(ns, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    if ns.processes < 1:
        raise ConfigError("--processes must be >= 1")
    if ns.processes > 1 and ns.port == 0:
        raise ConfigError("--processes > 1 needs a fixed --port (they share it)")
    if ns.first_byte_timeout is None:
        ns.first_byte_timeout = ns.request_timeout
    return ns
