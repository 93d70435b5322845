"""Engine protocol and registry: how one worker process of a given engine kind is launched.

An engine turns a ``WorkerLaunch`` (everything the planner decided for one process) into an argv.
sglang and the mock share SGLang's flag set, so the mock proves the same command lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from hpcserve.cmdline.server import ServerArgs


@dataclass(frozen=True)
class WorkerLaunch:
    """One engine process as planned. Host placeholders are filled by the node agent at run time."""

    model_path: str
    served_name: str
    mode: str                      # null | prefill | decode
    host: str                      # bind address placeholder, e.g. "{addr}"
    port: int
    tp: int
    dp: int
    ep: int
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None   # "{host:N}:PORT": multi-node replicas and DP attention
    bootstrap_port: int | None = None
    nccl_port: int | None = None        # planned, so SGLang does not pick port + random(100, 1000) itself
    transfer_backend: str | None = None
    ib_device: str | None = None
    user_args: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)   # engine-specific (e.g. mock timing)
    python: str = "python3"


class Engine(Protocol):
    name: str

    def argv(self, w: WorkerLaunch) -> list[str]: ...


ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    _load_builtin()
    return ENGINES[name]


def args_to_flags(args: dict[str, Any]) -> list[str]:
    """Engine args dict -> flags the way SGLang expects, keys kept in order.

    true -> bare flag, false/None -> omitted, list -> flag followed by every value, dict -> JSON.
    """
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            out.append(flag)
            out.extend(_scalar(v) for v in value)
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, separators=(",", ":"), sort_keys=False)]
        else:
            out += [flag, _scalar(value)]
    return out


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def server_args(w: WorkerLaunch) -> ServerArgs:
    """The SGLang server flags the planner decided for one worker (hpcserve/cmdline/server.py owns them);
    only the fields set here are written, the engine's defaults cover the rest."""
    given: dict[str, Any] = dict(model_path=w.model_path, served_model_name=w.served_name, host=w.host,
                                 port=w.port, tp_size=w.tp)
    if w.dp > 1:
        given["dp_size"] = w.dp
    if w.ep > 1:
        given["ep_size"] = w.ep
    if w.nccl_port:
        given["nccl_port"] = w.nccl_port
    if w.nnodes > 1:
        given.update(nnodes=w.nnodes, node_rank=w.node_rank)
    if w.dist_init_addr:  # multi-node, or single-node DP attention (its ZMQ ports derive from it)
        given["dist_init_addr"] = w.dist_init_addr
    if w.mode != "null":
        given.update(disaggregation_mode=w.mode, disaggregation_transfer_backend=w.transfer_backend)
        if w.mode == "prefill":
            given["disaggregation_bootstrap_port"] = w.bootstrap_port
        if w.ib_device:
            given["disaggregation_ib_device"] = w.ib_device
    return ServerArgs(**given)


def sglang_server_flags(w: WorkerLaunch) -> list[str]:
    """The flags both sglang and the stand-in engines take (docs/design.md, "SGLang PD protocol"), then the
    recipe's own engine args."""
    return server_args(w).to_argv() + args_to_flags(w.user_args)


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from hpcserve.engines import dynamo, mock, sglang  # noqa: F401  (registers; imports no dynamo)
        from hpcserve.engines import torch as _torch  # noqa: F401  (registers; imports no torch)


_load_builtin()
