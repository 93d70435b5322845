"""Command line of the mock engine: sglang.launch_server's flags (hpcserve/cmdline/server.py) plus --mock-*.

The planner emits the same argv for sglang and the mock, so every sglang flag must be accepted. Flags the
mock does not model (tuning knobs such as --mem-fraction-static) are recorded and reported in /server_info.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from hpcserve.cmdline.server import ServerArgs, dist_host_port
from hpcserve.errors import UsageError

__all__ = ["MockConfig", "UsageError", "dist_host_port", "parse_args", "usage"]


@dataclass
class MockConfig:
    model_path: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    nccl_port: int | None = None
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = 8998
    disaggregation_transfer_backend: str | None = None
    disaggregation_ib_device: str | None = None
    enable_metrics: bool = False
    base_gpu_id: int = 0
    api_key: str | None = None
    incremental_streaming_output: bool = False
    # timing model (milliseconds of model time; multiplied by time_scale to get wall time)
    prefill_base_ms: float = 0.0
    prefill_per_token_ms: float = 0.0
    decode_step_ms: float = 0.0
    decode_step_per_seq_ms: float = 0.0
    max_running: int = 256
    time_scale: float = 0.0
    startup_delay: float = 0.0
    bootstrap_timeout: float = 30.0
    default_max_tokens: int = 16
    join_timeout: float = 300.0
    context_length: int = 131072
    argv: list[str] = field(default_factory=list)
    extra_args: dict[str, Any] = field(default_factory=dict)

    def server_args(self) -> dict[str, Any]:
        """The parsed values under SGLang's names (what /server_info reports), extras included."""
        out = {k: getattr(self, k) for k in _SGLANG_KEYS}
        out["tokenizer_path"] = self.model_path
        out["context_length"] = self.context_length
        for key, value in self.extra_args.items():
            out.setdefault(key, value)
        return out

    def mock_args(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _MOCK_KEYS}


# SGLang's names reported by /server_info (api_key is a secret, context_length is added resolved)
_SGLANG_KEYS = tuple(k for k in ServerArgs.flags() if k not in ("api_key", "context_length",
                                                                 "incremental_streaming_output"))
_MOCK_KEYS = ("prefill_base_ms", "prefill_per_token_ms", "decode_step_ms", "decode_step_per_seq_ms",
              "max_running", "time_scale", "startup_delay", "bootstrap_timeout", "default_max_tokens",
              "join_timeout")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we want one line
        raise UsageError(message)


def _count(text: str) -> int:
    """An integer, also written as a float ("8.0"): recipes keep mock options as numbers."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}")
    return int(value)


def _parser() -> _Parser:
    p = _Parser(prog="python -m hpcserve.mock", add_help=False, allow_abbrev=False)
    a = p.add_argument
    ServerArgs.add_arguments(p)
    a("--mock-prefill-base-ms", type=float, default=0.0)
    a("--mock-prefill-per-token-ms", type=float, default=0.0)
    a("--mock-decode-step-ms", type=float, default=0.0)
    a("--mock-decode-step-per-seq-ms", type=float, default=0.0)
    a("--mock-max-running", type=_count, default=256)
    a("--mock-time-scale", type=float, default=0.0)
    a("--mock-startup-delay", type=float, default=0.0)
    a("--mock-bootstrap-timeout", type=float, default=30.0)
    a("--mock-default-max-tokens", type=_count, default=16)
    a("--mock-join-timeout", type=float, default=300.0)
    p.add_argument("-h", "--help", action="store_true")
    return p


def usage() -> str:
    return _parser().format_help()


def _record_extras(rest: list[str]) -> dict[str, Any]:
    """Unmodelled sglang flags -> {name: value}: bare flag -> True, one value -> str, several -> list."""
    extras: dict[str, Any] = {}
    key: str | None = None
    for tok in rest:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[2:].partition("=")
            key = name.replace("-", "_")
            extras[key] = value if eq else True
            if eq:
                key = None
        elif key is None:
            raise UsageError(f"unexpected argument {tok!r} (flags start with --)")
        else:
            cur = extras[key]
            extras[key] = tok if cur is True else (cur + [tok] if isinstance(cur, list) else [cur, tok])
    return extras


def parse_args(argv: list[str]) -> MockConfig:
    ns, rest = _parser().parse_known_args(argv)
    if ns.help:
        raise UsageError("help requested")
    bad = [t.split("=")[0] for t in rest if t.startswith("--mock-")]
    if bad:
        raise UsageError(f"unknown mock flag {bad[0]} (see --help for the --mock-* options)")
    server = ServerArgs.from_namespace(ns).check()
    shared = server.model_dump()
    shared["served_model_name"] = server.served_model_name or server.model_path
    if server.context_length is None:
        del shared["context_length"]      # the mock's own default
    cfg = MockConfig(
        **shared,
        prefill_base_ms=ns.mock_prefill_base_ms, prefill_per_token_ms=ns.mock_prefill_per_token_ms,
        decode_step_ms=ns.mock_decode_step_ms, decode_step_per_seq_ms=ns.mock_decode_step_per_seq_ms,
        max_running=ns.mock_max_running, time_scale=ns.mock_time_scale, startup_delay=ns.mock_startup_delay,
        bootstrap_timeout=ns.mock_bootstrap_timeout, default_max_tokens=ns.mock_default_max_tokens,
        join_timeout=ns.mock_join_timeout, argv=list(argv), extra_args=_record_extras(rest))
    _validate(cfg)
    return cfg


def _validate(cfg: MockConfig) -> None:
    """The --mock-* options' checks (the shared flags were checked by ServerArgs.check)."""
    for name in ("max_running", "default_max_tokens"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--mock-{name.replace('_', '-')} must be at least 1")
    for name in ("time_scale", "startup_delay", "bootstrap_timeout", "prefill_base_ms", "prefill_per_token_ms",
                 "decode_step_ms", "decode_step_per_seq_ms", "join_timeout"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--mock-{name.replace('_', '-')} must not be negative")
