"""Planning SGLang's native /generate request: prompts (text or ids, single or batch), per-item sampling
parameters, parallel samples (``sampling_params.n``), bootstrap fields, and refusals SGLang gives."""

from __future__ import annotations

from typing import Any

from hpcserve.engine_shell.oai_protocol import lora_refusal
from hpcserve.engine_shell.tokenizer import Prompt
from hpcserve.mock.engine import Boot, Engine, Job
from hpcserve.mock.model import SamplingParams


def _pick(value: Any, i: int, n: int, name: str) -> Any:
    """Item i of a batch field: lists are per item, scalars apply to all."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {n}")
        return value[i]
    return value


def plan_native(cfg, engine: Engine, body: dict) -> tuple[list[Job], bool]:
    """The jobs of one /generate body (batch items times parallel samples) and whether the answer is a list."""
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None:
        batch = isinstance(text, list)
        items = text if batch else [text]
        if not all(isinstance(t, str) for t in items):
            raise ValueError("text must be a string or a list of strings")
        prompts = [Prompt.from_text(t) for t in items]
    elif ids is not None:
        if not isinstance(ids, list) or not ids:
            raise ValueError("input_ids must be a non-empty list")
        batch = isinstance(ids[0], list)
        prompts = [Prompt.from_ids(x) for x in (ids if batch else [ids])]
    else:
        raise ValueError("the request needs text or input_ids")
    n = len(prompts)
    if n == 0:
        raise ValueError("empty batch")
    spd, rid = body.get("sampling_params"), body.get("rid")
    lora = body.get("lora_path")
    if lora:
        first = lora if isinstance(lora, str) else next((a for a in lora if a), None)
        lora_refusal(f"{cfg.served_model_name}:{first}", cfg.served_model_name)
    host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
    if batch and room is not None and not isinstance(room, list):
        raise ValueError("bootstrap_room must be a list (one room per item) for a batch request")
    first_sp = spd[0] if isinstance(spd, list) and spd else spd
    samples = (first_sp.get("n") if isinstance(first_sp, dict) else None) or 1
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError("sampling_params.n must be a positive integer")
    dmt = cfg.default_max_tokens
    jobs = []
    for i, prompt in enumerate(prompts):
        sp = SamplingParams.from_dict(_pick(spd, i, n, "sampling_params") if batch else spd, dmt)
        item_room = _pick(room, i, n, "bootstrap_room")
        for j in range(samples):  # parallel sampling: SGLang counts a single room up over the samples
            r = item_room if j == 0 or not isinstance(item_room, int) else item_room + j * n
            boot = Boot(_pick(host, i, n, "bootstrap_host"), _pick(port, i, n, "bootstrap_port"),
                        r) if (host, port, room) != (None, None, None) else None
            item_rid = _pick(rid, i, n, "rid") if batch else rid
            jobs.append(engine.plan(prompt, sp.sample(j), boot, None if j and item_rid else item_rid))
    return jobs, batch or samples > 1

