"""Command line of ``python -m hpcserve.torchengine``: SGLang's server flags (hpcserve/cmdline/server.py) plus
``--torch-*`` options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from hpcserve.cmdline.server import ServerArgs
from hpcserve.errors import UsageError

__all__ = ["EngineConfig", "UsageError", "build_parser", "parse_args"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


@dataclass
class EngineConfig:
    model_path: str
    served_model_name: str
    host: str
    port: int
    mode: str
    bootstrap_port: int
    context_length: int
    tiny: Any                 # model.TinyConfig (torch is imported only once the flags parse)
    seed: int
    threads: int
    bootstrap_timeout: float
    default_max_tokens: int
    max_running: int = 32
    argv: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    def server_args(self) -> dict:
        return {"model_path": self.model_path, "served_model_name": self.served_model_name, "host": self.host,
                "port": self.port, "tp_size": 1, "dp_size": 1, "disaggregation_mode": self.mode,
                "disaggregation_bootstrap_port": self.bootstrap_port, "context_length": self.context_length}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hpcserve.torchengine", add_help=True,
                description="Tiny Llama-style torch engine speaking SGLang's HTTP API (CPU correctness oracle).")
    ServerArgs.add_arguments(p)
    t = p.add_argument_group("torch engine options (sizes apply to --model-path random)")
    t.add_argument("--torch-layers", type=int, default=2)
    t.add_argument("--torch-dim", type=int, default=64)
    t.add_argument("--torch-heads", type=int, default=4)
    t.add_argument("--torch-kv-heads", type=int, default=2)
    t.add_argument("--torch-ffn", type=int, default=128)
    t.add_argument("--torch-max-seq", type=int, default=2048)
    t.add_argument("--torch-seed", type=int, default=0, help="seed of the random weights")
    t.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    t.add_argument("--torch-bootstrap-timeout", type=float, default=30.0,
                   help="seconds a decode waits for the KV (and a prefill for its decode)")
    t.add_argument("--torch-default-max-tokens", type=int, default=16)
    t.add_argument("--torch-max-running", type=int, default=32, help="sequences advanced per iteration")
    return p


def parse_args(argv: list[str]) -> EngineConfig:
    ns, extra = build_parser().parse_known_args(argv)
    bad = [x for x in extra if x.startswith("--torch-")]
    if bad:
        raise UsageError(f"unknown option {bad[0]} (see python -m hpcserve.torchengine --help)")
    server = ServerArgs.from_namespace(ns).check()
    from hpcserve.torchengine.model import TinyConfig
    if server.tp_size != 1 or server.dp_size != 1 or server.ep_size != 1 or server.nnodes != 1:
        raise UsageError("the torch engine runs one process per server: use --tp-size 1 --dp-size 1 --nnodes 1")
    try:
        tiny = TinyConfig(dim=ns.torch_dim, n_layers=ns.torch_layers, n_heads=ns.torch_heads,
                          n_kv_heads=ns.torch_kv_heads, ffn_dim=ns.torch_ffn, max_seq=ns.torch_max_seq)
    except ValueError as err:
        raise UsageError(f"--torch-* sizes: {err}") from None
    return EngineConfig(model_path=server.model_path, served_model_name=server.served_model_name or server.model_path,
                        host=server.host, port=server.port, mode=server.disaggregation_mode,
                        bootstrap_port=server.disaggregation_bootstrap_port,
                        context_length=server.context_length or tiny.max_seq, tiny=tiny, seed=ns.torch_seed,
                        threads=ns.torch_threads, bootstrap_timeout=ns.torch_bootstrap_timeout,
                        default_max_tokens=ns.torch_default_max_tokens,
                        max_running=max(1, ns.torch_max_running), argv=list(argv), extra_args=extra)
