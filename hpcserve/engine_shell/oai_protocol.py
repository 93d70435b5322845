"""SGLang 0.5.23's OpenAI request checks and logprob shapes, shared by the mock and the torch engine.

Validation follows the order SGLang applies it: the pydantic request model (answered 400 with type
"Bad Request" and pydantic's message), then ``_validate_request`` ("Prompt cannot be empty", "Messages
cannot be empty."), then the LoRA adapter named by ``model: "base:adapter"`` (refused: no LoRA here), then
constraints that need a grammar backend (refused as SGLang does with --grammar-backend none). Log
probabilities come in as SGLang's engine triples ``[logprob, token_id, token_text]``.
"""

from __future__ import annotations

from typing import Any, Callable

COMPLETION_DEFAULT_MAX_TOKENS = 16   # CompletionRequest.max_tokens; chat has no default (the rest of the context)
GENERIC_ROLES = ("system", "assistant", "tool", "function", "developer", "latest_reminder", "root")
GRAMMAR_OFF = ("Grammar-based generation (json_schema, regex, ebnf, structural_tag) is not supported when the "
               "server is launched with --grammar-backend none")


class ApiError(ValueError):
    """A refusal with SGLang's status, error type and message."""

    def __init__(self, message: str, kind: str = "BadRequestError", status: int = 400) -> None:
        super().__init__(message)
        self.message, self.kind, self.status = message, kind, status


def _pydantic(model: str, errors: list[tuple[str, str, Any]]) -> ApiError:
    """A RequestValidationError as SGLang's handler words it (400, type "Bad Request")."""
    n = len(errors)
    lines = [f"{n} validation error{'s' if n > 1 else ''} for {model}"]
    for loc, msg, value in errors:
        kind = "value_error" if msg.startswith("Value error") else "type_error"
        lines.append(f"{loc}\n  {msg} [type={kind}, input_value={value!r}, input_type={type(value).__name__}]")
    return ApiError("\n".join(lines), "Bad Request")


def _int_field(body: dict, name: str, model: str, optional: bool) -> None:
    v = body.get(name)
    if name not in body or (v is None and optional):
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise _pydantic(model, [(name, "Input should be a valid integer", v)])


def lora_refusal(model: Any, served: str) -> None:
    """``model: "base:adapter"`` asks for a LoRA adapter; this server runs without --enable-lora."""
    if not isinstance(model, str) or ":" not in model or model == served:
        return
    adapter = model[len(served) + 1:] if model.startswith(served + ":") else model.split(":", 1)[1]
    adapter = adapter.strip()
    if adapter:
        raise ApiError(f"LoRA adapter '{adapter}' was requested, but LoRA is not enabled. Please launch the server "
                       "with --enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter "
                       "endpoint.")


def _grammar_refusal(body: dict) -> None:
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
        raise ApiError(GRAMMAR_OFF)
    if any(body.get(k) for k in ("regex", "ebnf", "json_schema", "structural_tag")):
        raise ApiError(GRAMMAR_OFF)


def _common(body: dict, model: str) -> None:
    for name, optional in (("n", False), ("seed", True), ("min_tokens", False), ("top_k", False)):
        _int_field(body, name, model, optional)
    if isinstance(body.get("n"), int) and body["n"] < 1:
        raise ApiError("n must be at least 1")


def check_completion(body: dict, served: str) -> None:
    model = "CompletionRequest"
    if "prompt" not in body:
        raise _pydantic(model, [("prompt", "Field required", body)])
    if "max_tokens" in body:
        v = body["max_tokens"]
        _int_field(body, "max_tokens", model, optional=False)
        if v <= 0:
            raise _pydantic(model, [("max_tokens", "Value error, max_tokens must be positive", v)])
    _int_field(body, "logprobs", model, optional=True)
    _common(body, model)
    p = body["prompt"]
    if not p or (isinstance(p, list) and all(not x for x in p)):
        raise ApiError("Prompt cannot be empty")
    lora_refusal(body.get("model"), served)
    _grammar_refusal(body)


def check_chat(body: dict, served: str) -> None:
    model = "ChatCompletionRequest"
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _pydantic(model, [("messages", "Input should be a valid list", messages)])
    errors = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            errors.append((f"messages.{i}", "Input should be a valid dictionary", m))
            continue
        role, content = m.get("role"), m.get("content")
        if role == "user":
            if not isinstance(content, (str, list)):
                errors.append((f"messages.{i}.ChatCompletionMessageUserParam.content",
                               "Input should be a valid string", content))
        elif not isinstance(role, str) or role.lower() not in GENERIC_ROLES:
            allowed = ", ".join(repr(r) for r in GENERIC_ROLES)
            errors.append((f"messages.{i}.ChatCompletionMessageGenericParam.role",
                           f"Value error, 'role' must be one of {allowed} (case-insensitive).", role))
            errors.append((f"messages.{i}.ChatCompletionMessageUserParam.role", "Input should be 'user'", role))
        elif content is not None and not isinstance(content, (str, list)):
            errors.append((f"messages.{i}.ChatCompletionMessageGenericParam.content",
                           "Input should be a valid string", content))
    if errors:
        raise _pydantic(model, errors)
    _int_field(body, "max_tokens", model, optional=True)
    _int_field(body, "max_completion_tokens", model, optional=True)
    _int_field(body, "top_logprobs", model, optional=True)
    _common(body, model)
    if not messages:
        raise ApiError("Messages cannot be empty.")
    lora_refusal(body.get("model"), served)
    _grammar_refusal(body)


def chat_max_tokens(body: dict) -> int | None:
    """``max_completion_tokens or max_tokens``, as SGLang reads it (0 and None both mean no limit)."""
    return body.get("max_completion_tokens") or body.get("max_tokens")


# ---- logprob shapes (from engine triples [logprob, token_id, token_text])

def char_offsets(data: bytes) -> list[int]:
    """Character offset of each byte-token in the decoded text (a continuation byte points at its character)."""
    out, chars = [], 0
    for b in data:
        cont = (b & 0xC0) == 0x80
        out.append(chars - 1 if cont and chars else chars)
        if not cont:
            chars += 1
    return out


def completion_logprobs(in_lps: list | None, in_top: list | None, out_lps: list, out_top: list | None,
                        token_str: Callable[[int], str], offsets: list[int]) -> dict:
    """An OpenAI completions ``logprobs`` object: prompt entries (echo) then output entries.

    ``offsets`` gives each token's character offset in the returned text; top lists are present only when
    top-N alternatives were asked for."""
    triples = (in_lps or []) + out_lps
    tops = ((in_top or []) + (out_top or [])) if out_top is not None else []
    return {"text_offset": offsets, "token_logprobs": [t[0] for t in triples],
            "tokens": [token_str(t[1]) for t in triples],
            "top_logprobs": [None if row is None else {token_str(t[1]): t[0] for t in row} for row in tops]}


def chat_logprobs(out_lps: list, out_top: list | None, token_bytes: Callable[[int], list[int]],
                  token_str: Callable[[int], str]) -> dict:
    content = []
    for i, (lp, tid, _) in enumerate(out_lps):
        row = out_top[i] if out_top and i < len(out_top) and out_top[i] else []
        content.append({"token": token_str(tid), "bytes": token_bytes(tid), "logprob": lp,
                        "top_logprobs": [{"token": token_str(t), "bytes": token_bytes(t), "logprob": v}
                                         for v, t, _ in row]})
    return {"content": content}


def usage(prompt_tokens: list[int], completion_tokens: list[int], n: int, cached_tokens: list[int] = ()) -> dict:
    """SGLang's UsageProcessor: prompt tokens once per prompt (every n-th choice), completions summed;
    cached prompt tokens reported once the KV cache saved something (kvcache.py), as with its cache report."""
    p = sum(prompt_tokens[::n])
    c = sum(completion_tokens)
    cached = sum(list(cached_tokens)[::n])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached} if cached else None}


def model_card(name: str, created: int, max_model_len: int | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "sglang", "root": name, "parent": None,
            "max_model_len": max_model_len}


def model_not_found(name: str) -> dict:
    """SGLang's 404 body for GET /v1/models/{id}."""
    return {"error": {"message": f"The model '{name}' does not exist", "type": "invalid_request_error",
                      "param": "model", "code": "model_not_found"}}
