"""SGLang's ``launch_server`` flags that hpcserve writes or reads: the engine launch contract.

The planner writes them for every engine kind (hpcserve/engines/); the mock and the torch engine parse them
with this class and layer their ``--mock-*`` / ``--torch-*`` options on top. Names and defaults are
SGLang 0.5's (tests/recipe/test_sglang_check.py holds them against sglang's own parser); ``SHORTHAND`` spellings are
the stand-ins' own conveniences. Field order is the order the planner writes them in.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from hpcserve.cmdline.argv import ArgsModel, flag
from hpcserve.errors import UsageError

# Accepted by the stand-in engines only (SGLang itself takes them as abbreviations, if at all).
SHORTHAND = {"tp_size": ("--tp",), "dp_size": ("--dp",), "incremental_streaming_output": ("--stream-output",)}


class ServerArgs(ArgsModel):
    prog = "python -m sglang.launch_server"

    model_path: Annotated[str, flag("--model", planned=True)] = Field(
        description="model directory or name ('random' for the torch engine's random weights)")
    served_model_name: Annotated[str | None, flag(planned=True)] = Field(
        None, description="model id in the API (default: --model-path)")
    host: Annotated[str, flag(planned=True)] = "127.0.0.1"
    port: Annotated[int, flag(planned=True)] = 30000
    tp_size: Annotated[int, flag("--tp", "--tensor-parallel-size", planned=True)] = 1
    dp_size: Annotated[int, flag("--dp", "--data-parallel-size", planned=True)] = 1
    ep_size: Annotated[int, flag("--ep", "--expert-parallel-size", planned=True)] = 1
    nccl_port: Annotated[int | None, flag(planned=True)] = Field(
        None, description="planned, so SGLang does not pick port + random(100, 1000) itself")
    nnodes: Annotated[int, flag(planned=True)] = 1
    node_rank: Annotated[int, flag(planned=True)] = 0
    dist_init_addr: Annotated[str | None, flag("--nccl-init-addr", planned=True)] = Field(
        None, description="HOST:PORT of node rank 0 (multi-node servers)")
    disaggregation_mode: Annotated[Literal["null", "prefill", "decode"], flag(planned=True)] = "null"
    disaggregation_transfer_backend: Annotated[str | None, flag(planned=True)] = Field(
        None, description="mooncake | nixl (default: SGLang's, mooncake)")
    disaggregation_bootstrap_port: Annotated[int, flag(planned=True)] = 8998
    disaggregation_ib_device: Annotated[str | None, flag(planned=True)] = None
    base_gpu_id: Annotated[int, flag(planned=True)] = Field(
        0, description="the agent places GPUs through CUDA_VISIBLE_DEVICES instead")
    # not planned: a recipe may set these through a group's args
    context_length: Annotated[int | None, flag()] = Field(None, description="default: the model's")
    enable_metrics: Annotated[bool, flag()] = False
    api_key: Annotated[str | None, flag()] = None
    incremental_streaming_output: Annotated[bool, flag("--stream-output")] = False

    @classmethod
    def sglang_spellings(cls, name: str) -> list[str]:
        """The spellings of one flag that SGLang's own parser knows (the stand-ins' shorthand left out)."""
        return [s for s in cls.spellings(name) if s not in SHORTHAND.get(name, ())]

    def check(self) -> "ServerArgs":
        """Values an engine cannot run with, as one-line UsageErrors naming the flag."""
        if not 0 < self.port < 65536:
            raise UsageError(f"--port {self.port} is not a TCP port (1-65535)")
        if self.disaggregation_mode == "prefill" and not 0 < self.disaggregation_bootstrap_port < 65536:
            raise UsageError(f"--disaggregation-bootstrap-port {self.disaggregation_bootstrap_port} is not a TCP port")
        for name in ("tp_size", "dp_size", "ep_size", "nnodes"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.nnodes > 1:
            if not self.dist_init_addr:
                raise UsageError("--nnodes > 1 needs --dist-init-addr HOST:PORT (the node-rank 0 address)")
            dist_host_port(self.dist_init_addr)
        return self


def dist_host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--dist-init-addr {addr!r} must look like HOST:PORT")
    return host.strip("[]"), int(port)
