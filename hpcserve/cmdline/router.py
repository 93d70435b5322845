"""``python -m hpcserve.router``'s flags: what the planner writes for the head node and the router parses.

The recipe's ``router`` section takes its policy names and defaults from here (hpcserve/recipe/schema.py), so
a run and a hand-started router behave alike. Policy defaults: ``round_robin`` in aggregated mode (replicas
are interchangeable, every one gets work from the first request; choose ``cache_aware`` or ``kv_aware`` when
prompts share long prefixes), ``cache_aware`` for PD prefill (prefix hits save prefill compute), ``least_load``
for PD decode (its KV arrives from the prefill, so prefix affinity buys nothing there). docs/router.md.
"""

from __future__ import annotations

import os
import typing
from typing import Annotated, Any, Literal

from pydantic import Field

from hpcserve.cmdline.argv import ArgsModel, flag
from hpcserve.errors import UsageError

# hpcserve/router/policies.py's POLICIES has exactly these (tests/engines/test_launch_args.py)
Policy = Literal["cache_aware", "kv_aware", "least_load", "power_of_two", "random", "round_robin"]
POLICY_NAMES: tuple[str, ...] = typing.get_args(Policy)

_SRC, _POL, _LIM, _TIME = "worker sources", "policies", "limits and auth", "timeouts and health"


class RouterArgs(ArgsModel):
    prog = "python -m hpcserve.router"
    description = "hpcserve head-node router for SGLang workers (PD or aggregated)."
    groups = (_SRC, _POL, _LIM, _TIME, "processes", "misc")

    host: Annotated[str, flag()] = Field("127.0.0.1", description="address to listen on")
    port: Annotated[int, flag()] = Field(8000, description="port to listen on (0: any free port)")
    mode: Annotated[Literal["pd", "aggregated"] | None, flag()] = Field(
        None, description="pd: prefill+decode pairs; aggregated: one worker per request "
                          "(default: pd if --prefill/--decode given)")
    redis_url: Annotated[str | None, flag(group=_SRC, env="HPCSERVE_REDIS_URL")] = Field(
        None, description="follow the worker registry in this Redis (default: $HPCSERVE_REDIS_URL)")
    run_id: Annotated[str | None, flag(group=_SRC, env="HPCSERVE_RUN_ID")] = Field(
        None, description="registry run id (default: $HPCSERVE_RUN_ID)")
    served_model_name: Annotated[str | None, flag(group="misc")] = Field(
        None, description="model id answered by /v1/models (default: ask a worker)")
    worker: Annotated[list[str], flag(group=_SRC, metavar="URL")] = Field(
        default_factory=list, description="static aggregated worker")
    prefill: Annotated[list[tuple[str, int]], flag(group=_SRC, nargs="+", metavar=("URL", "BOOTSTRAP_PORT"))] = \
        Field(default_factory=list, description="static prefill worker and its bootstrap port (default port 8998)")
    decode: Annotated[list[str], flag(group=_SRC, metavar="URL")] = Field(
        default_factory=list, description="static decode worker")
    registry_rescan: Annotated[float, flag(group=_SRC)] = Field(2.0, description="seconds between full rescans")
    policy: Annotated[Policy, flag(group=_POL)] = Field("round_robin", description="aggregated mode policy")
    prefill_policy: Annotated[Policy, flag(group=_POL)] = Field("cache_aware", description="PD prefill policy")
    decode_policy: Annotated[Policy, flag(group=_POL)] = Field("least_load", description="PD decode policy")
    cache_threshold: Annotated[float, flag(group=_POL)] = Field(
        0.5, description="cache_aware: minimum matched fraction of the prompt to follow the match")
    balance_abs_threshold: Annotated[int, flag(group=_POL)] = Field(
        32, description="cache_aware: in-flight difference (max-min) above which load wins over cache")
    balance_rel_threshold: Annotated[float, flag(group=_POL)] = Field(
        1.5, description="cache_aware: ... and max > min * this")
    max_tree_chars: Annotated[int, flag(group=_POL)] = Field(8_000_000, description="cache_aware: prefix tree bound")
    kv_overlap_weight: Annotated[float, flag(group=_POL)] = Field(
        4.0, description="kv_aware: weight of blocks to prefill against in-flight uncached blocks")
    kv_request_weight: Annotated[float, flag(group=_POL)] = Field(
        64.0, description="kv_aware: cost of each in-flight request on a worker, in blocks")
    kv_block_size: Annotated[int | None, flag(group=_POL)] = Field(
        None, description="kv_aware: tokens per KV block (default: the workers' /server_info kv_events)")
    kv_tokenizer: Annotated[str | None, flag(group=_POL, metavar="TOKENIZER_JSON")] = Field(
        None, description="kv_aware: the model's tokenizer.json (default: the mock's byte tokenizer)")
    api_key_env: Annotated[str | None, flag(group=_LIM, metavar="NAME")] = Field(
        None, description="require 'Authorization: Bearer $NAME'")
    max_body_bytes: Annotated[int, flag(group=_LIM)] = 32 * 1024 * 1024
    max_concurrency: Annotated[int, flag(group=_LIM)] = Field(0, description="requests in flight at once (0: none)")
    queue_size: Annotated[int, flag(group=_LIM)] = Field(256, description="requests waiting beyond that (more: 429)")
    queue_timeout: Annotated[float, flag(group=_LIM)] = Field(60.0, description="seconds a queued request waits")
    request_timeout: Annotated[float, flag(group=_TIME)] = Field(1800.0, description="whole upstream request, s")
    connect_timeout: Annotated[float, flag(group=_TIME)] = 5.0
    first_byte_timeout: Annotated[float | None, flag(group=_TIME)] = Field(
        None, description="default: --request-timeout")
    idle_timeout: Annotated[float, flag(group=_TIME)] = Field(600.0, description="longest silence in a response")
    max_retries: Annotated[int, flag(group=_TIME)] = Field(
        2, description="other workers tried after a connect failure")
    max_redispatch: Annotated[int, flag(group=_TIME)] = Field(
        2, description="times a request is sent again to another worker after its worker died or stalled "
                       "before the client got a byte (0: never)")
    health_interval: Annotated[float, flag(group=_TIME)] = Field(
        2.0, description="seconds between probe rounds; a stalled worker is ejected within two of them")
    health_timeout: Annotated[float | None, flag(group=_TIME)] = Field(
        None, description="probe timeout (default and maximum: --health-interval); no answer in time = stalled")
    eject_after: Annotated[int, flag(group=_TIME)] = Field(3, description="consecutive failures that eject a worker")
    readmit_after: Annotated[int, flag(group=_TIME)] = Field(
        2, description="consecutive probe successes that readmit it")
    processes: Annotated[int, flag(group="processes")] = Field(
        1, description="router processes sharing the port (SO_REUSEPORT); each keeps its own policy state, "
                       "limits are split between them, /metrics sums them all")
    log_level: Annotated[Literal["debug", "info", "warning", "error"], flag(group="misc")] = "info"
    # resolved at start, never flags
    api_key: str | None = None        # the value of $API_KEY_ENV
    share_dir: str | None = None      # --processes > 1: where the processes share metrics

    @classmethod
    def prepare(cls, given: dict[str, Any]) -> dict[str, Any]:
        prefills = []
        for item in given.get("prefill", []):
            if len(item) > 2:
                raise UsageError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(item)}")
            port = 8998
            if len(item) == 2:
                if not item[1].isdigit() or not 0 < int(item[1]) < 65536:
                    raise UsageError(f"--prefill {item[0]}: bootstrap port {item[1]!r} must be a number in 1-65535")
                port = int(item[1])
            prefills.append((item[0], port))
        if "prefill" in given:
            given["prefill"] = prefills
        return given

    def resolve(self) -> "RouterArgs":
        """Checks across flags, then the values the router derives at start (mode, API key, first-byte timeout);
        every mistake is a one-line UsageError."""
        if self.mode is None:
            self.mode = "pd" if (self.prefill or self.decode) else "aggregated"
        if self.mode == "pd" and self.worker:
            raise UsageError("--worker is for --mode aggregated; in pd mode use --prefill URL PORT and --decode URL")
        if self.mode == "aggregated" and (self.prefill or self.decode):
            raise UsageError("--prefill/--decode need --mode pd; aggregated workers are given with --worker URL")
        if bool(self.redis_url) != bool(self.run_id):
            raise UsageError("--redis-url and --run-id go together (or set HPCSERVE_REDIS_URL and HPCSERVE_RUN_ID)")
        if not (self.redis_url or self.worker or self.prefill or self.decode):
            raise UsageError("no workers: give --redis-url URL --run-id ID, or static --worker / --prefill / --decode")
        if self.api_key_env:
            self.api_key = os.environ.get(self.api_key_env)
            if not self.api_key:
                raise UsageError(f"--api-key-env {self.api_key_env}: that environment variable is empty or unset")
        for name in ("max_body_bytes", "queue_size", "max_concurrency", "max_retries", "max_redispatch"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("request_timeout", "connect_timeout", "idle_timeout", "health_interval", "health_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0")
        if self.processes < 1:
            raise UsageError("--processes must be >= 1")
        if self.processes > 1 and self.port == 0:
            raise UsageError("--processes > 1 needs a fixed --port (they share it)")
        if self.first_byte_timeout is None:
            self.first_byte_timeout = self.request_timeout
        return self
