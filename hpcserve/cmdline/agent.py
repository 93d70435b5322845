"""``hpcserve node``'s flags: the node agent's command line, written by the batch script (render) and the local
backend, parsed by the agent."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from hpcserve.cmdline.argv import ArgsModel, flag


class AgentArgs(ArgsModel):
    prog = "hpcserve node"
    description = "The node agent: runs this node's part of a plan (or of every point of a sweep)."

    plan: Annotated[str | None, flag()] = Field(None, description="the plan.json of one deployment (or --sweep)")
    sweep: Annotated[str | None, flag(metavar="RUN_DIR")] = Field(
        None, description="walk every point of a sweep (RUN_DIR/sweep.json) in one allocation")
    run_dir: Annotated[str | None, flag()] = Field(None, description="default: the plan's folder")
    node_rank: Annotated[int | None, flag()] = Field(None, description="default: SLURM_NODEID")
    run_id: Annotated[str | None, flag()] = Field(None, description="default: the run dir's name")
