"""``python -m hpcserve.batch``'s flags: the batch driver's command line, written by the planner (the batch
stage on the head node), parsed by the driver. ``ShardArgs`` is the part that names one shard's input and
output, shared with ``python -m hpcserve.batch check``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from hpcserve.cmdline.argv import ArgsModel, flag


class ShardArgs(ArgsModel):
    prog = "python -m hpcserve.batch check"
    description = "Exit 0 if every input row of the shard has an output row, else 3."

    input: Annotated[str, flag()] = Field(description="input JSONL, one request per line")
    output: Annotated[str, flag()] = Field(
        description="output JSONL; with --num-shards > 1 the shard writes OUTPUT.part-IIII-of-NNNN")
    shard_index: Annotated[int, flag()] = 0
    num_shards: Annotated[int, flag()] = 1


class BatchArgs(ShardArgs):
    prog = "python -m hpcserve.batch"
    description = "Run one shard of an offline batch."

    router: Annotated[str, flag()] = Field(description="router (or engine) base URL, e.g. http://head:8000")
    concurrency: Annotated[int, flag()] = Field(64, description="requests in flight")
    max_retries: Annotated[int, flag()] = 3
    request_timeout: Annotated[float, flag()] = Field(600.0, description="seconds per attempt")
    stop_grace: Annotated[float, flag()] = Field(
        20.0, description="seconds in-flight rows get to finish after SIGUSR2/SIGTERM")
    api: Annotated[Literal["generate", "completions"], flag()] = Field(
        "generate", description="send prompt and input_ids rows to SGLang's /generate, or to /v1/completions "
                                "(an endpoint with OpenAI routes only, such as a Dynamo frontend)")
    model: Annotated[str | None, flag()] = Field(
        None, description="model name for OpenAI rows without one (default: from /v1/models)")
    api_key_env: Annotated[str, flag()] = Field(
        "HPCSERVE_API_KEY", description="environment variable holding the router's bearer key (if set)")
    redis_url: Annotated[str | None, flag(env="HPCSERVE_REDIS_URL")] = Field(
        None, description="write progress into the run's status hash (needs --run-id)")
    run_id: Annotated[str | None, flag(env="HPCSERVE_RUN_ID")] = None
    checkpoint_rows: Annotated[int, flag()] = Field(1000, description="fsync every N rows (and at exit)")
    checkpoint_seconds: Annotated[float, flag()] = Field(5.0, description="fsync at least this often")
