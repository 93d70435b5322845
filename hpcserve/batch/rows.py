"""Input rows: parse one JSONL line into a request for the router, or into an error row.

A line is one JSON object with an optional ``id`` (string or integer; default: the 1-based line number)
and exactly one of ``prompt`` (text), ``messages`` (OpenAI chat) or ``input_ids`` (token ids).
``prompt`` and ``input_ids`` rows go to SGLang's ``/generate``; OpenAI sampling parameters given at the
top level (``max_tokens``, ``temperature``, ...) are translated into SGLang ``sampling_params``; keys in an
explicit ``sampling_params`` object win. Against an endpoint that serves OpenAI routes only (a Dynamo
frontend: ``api="completions"``) the same rows go to ``/v1/completions`` with OpenAI names. ``messages``
rows go to ``/v1/chat/completions``; other keys are passed through unchanged so every OpenAI chat option
works. Ids are compared as strings (1 and "1" are the same id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

GENERATE = "/generate"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
APIS = ("generate", "completions")  # what prompt and input_ids rows are sent as

# OpenAI name -> SGLang sampling_params name, for rows sent to /generate.
OPENAI_TO_SAMPLING = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "seed": "sampling_seed",
    "logit_bias": "logit_bias",
    "n": "n",
}
# The reverse, for sampling_params given on a chat or completions row.
SAMPLING_TO_OPENAI = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed"}
META_KEYS = ("id", "model", "metadata")  # never sent as sampling options; metadata is ignored
KINDS = ("prompt", "messages", "input_ids")


@dataclass(slots=True)
class Request:
    """A row ready to send. ``model`` is filled in for OpenAI rows by the driver when the row has none."""

    line_no: int
    id: Any
    key: str
    path: str
    body: dict


@dataclass(slots=True)
class BadRow:
    line_no: int
    id: Any
    key: str
    error: str


def id_key(row_id: Any) -> str:
    return row_id if isinstance(row_id, str) else str(row_id)


def parse_line(line: bytes, line_no: int, api: str = "generate") -> Request | BadRow:
    """Never raises: anything wrong with the line becomes a BadRow carrying the reason. ``api``: what
    prompt and input_ids rows are sent as (one of APIS)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return _bad(line_no, line_no, f"not valid JSON ({e})")
    if not isinstance(obj, dict):
        return _bad(line_no, line_no, f"expected a JSON object, got {type(obj).__name__}")
    row_id = obj.get("id", line_no)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return _bad(line_no, line_no, f"'id' must be a string or an integer, got {row_id!r:.60}")
    kinds = [k for k in KINDS if k in obj]
    if len(kinds) != 1:
        what = "none" if not kinds else " and ".join(kinds)
        return _bad(line_no, row_id, f"needs exactly one of 'prompt', 'messages', 'input_ids' (found {what})")
    try:
        if kinds[0] == "messages":
            path, body = CHAT, _chat_body(obj)
        elif api == "completions":
            path, body = COMPLETIONS, _completions_body(_generate_body(obj, kinds[0]))
        else:
            path, body = GENERATE, _generate_body(obj, kinds[0])
    except ValueError as e:
        return _bad(line_no, row_id, str(e))
    return Request(line_no, row_id, id_key(row_id), path, body)


def input_key(line: bytes, line_no: int) -> str:
    """The id key parse_line would give this line, without building the request (for merge)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return str(line_no)
    row_id = obj.get("id", line_no) if isinstance(obj, dict) else line_no
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        row_id = line_no
    return id_key(row_id)


def _bad(line_no: int, row_id: Any, why: str) -> BadRow:
    return BadRow(line_no, row_id, id_key(row_id), f"line {line_no}: {why}")


def _generate_body(obj: dict, kind: str) -> dict:
    value = obj[kind]
    if kind == "prompt" and not isinstance(value, str):
        raise ValueError("'prompt' must be a string (use 'input_ids' for token ids)")
    if kind == "input_ids" and not (
        isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        raise ValueError("'input_ids' must be a non-empty list of integers")
    sampling: dict = {}
    for key, val in obj.items():
        if key in META_KEYS or key == kind or key == "sampling_params":
            continue
        target = OPENAI_TO_SAMPLING.get(key)
        if target is None:
            raise ValueError(f"unknown key {key!r} (prompt rows take OpenAI sampling keys or 'sampling_params')")
        sampling[target] = val
    sampling.update(_sampling_params(obj))
    if sampling.get("n", 1) != 1:
        raise ValueError("'n' other than 1 is not supported in a batch (repeat the row with other ids)")
    body: dict = {"text" if kind == "prompt" else "input_ids": value, "sampling_params": sampling}
    return body


def _completions_body(generate: dict) -> dict:
    """The /generate body of a row as an OpenAI completions body: prompt text or token ids, OpenAI names."""
    body = {"prompt": generate["text"] if "text" in generate else generate["input_ids"]}
    for key, val in generate["sampling_params"].items():
        body[SAMPLING_TO_OPENAI.get(key, key)] = val
    return body


def _chat_body(obj: dict) -> dict:
    messages = obj["messages"]
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise ValueError("'messages' must be a non-empty list of objects")
    body = {k: v for k, v in obj.items() if k not in ("id", "metadata", "sampling_params")}
    for key, val in _sampling_params(obj).items():
        body[SAMPLING_TO_OPENAI.get(key, key)] = val
    if body.get("stream"):
        raise ValueError("'stream' is not supported in a batch")
    body.pop("stream", None)
    if body.get("n", 1) != 1:
        raise ValueError("'n' other than 1 is not supported in a batch (repeat the row with other ids)")
    return body


def _sampling_params(obj: dict) -> dict:
    sp = obj.get("sampling_params", {})
    if not isinstance(sp, dict):
        raise ValueError("'sampling_params' must be an object")
    return sp


def ok_row(row_id: Any, text: str, prompt_tokens: int, completion_tokens: int,
           finish_reason: Any, latency_s: float) -> bytes:
    """One output line. Keys come in this order, ``id`` first, so resume scans stay simple."""
    return orjson.dumps({
        "id": row_id,
        "text": text,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "finish_reason": finish_reason,
        "latency_s": round(latency_s, 4),
    }) + b"\n"


def error_row(row_id: Any, error: str) -> bytes:
    return orjson.dumps({"id": row_id, "error": error}) + b"\n"


def parse_response(path: str, payload: Any) -> tuple[str, int, int, Any]:
    """(text, prompt_tokens, completion_tokens, finish_reason) from a /generate, completions or chat answer.
    Raises ValueError when the answer does not have the expected shape."""
    try:
        if path == GENERATE:
            if isinstance(payload, list):  # a server may answer a single request as a batch of one
                payload = payload[0]
            meta = payload.get("meta_info") or {}
            finish = meta.get("finish_reason")
            if isinstance(finish, dict):
                finish = finish.get("type")
            return (payload["text"], int(meta.get("prompt_tokens", 0)),
                    int(meta.get("completion_tokens", 0)), finish)
        choice = payload["choices"][0]
        usage = payload.get("usage") or {}
        text = choice["text"] if path == COMPLETIONS else choice["message"].get("content")
        return (text if text is not None else "", int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)), choice.get("finish_reason"))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"unexpected response shape from {path}: {type(e).__name__}: {e}") from None
