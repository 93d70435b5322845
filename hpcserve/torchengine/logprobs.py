"""Log-probabilities from real logits, in SGLang's engine shape: one row per position,
``(logprob, [(alt_logprob, alt_id), ...])`` with the top-N alternatives (most likely first).

Rows are computed only for requests that ask (``top`` is None otherwise). A PD prefill ships the row of
the token it sampled to the decode server with the KV cache, so PD and one process report the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcserve.engine_shell.tokenizer import token_text

Row = tuple[float, list[tuple[float, int]]]


def row(logits: torch.Tensor, token: int, top: int) -> Row:
    ls = torch.log_softmax(logits.float(), -1)
    alts: list[tuple[float, int]] = []
    if top:
        vals, idx = torch.topk(ls, min(top, ls.shape[-1]))
        alts = list(zip(vals.tolist(), idx.tolist()))
    return float(ls[token]), alts


def prompt_rows(logits: torch.Tensor, targets: list[int], top: int) -> list[Row]:
    """Rows for prompt positions 1.. from the logits of positions 0..n-2 (position 0 has no row)."""
    return [row(logits[i], t, top) for i, t in enumerate(targets)]


def to_json(r: Row) -> list:
    return [r[0], [list(a) for a in r[1]]]


def from_json(doc: Any) -> Row:
    return float(doc[0]), [(float(v), int(t)) for v, t in doc[1]]


def triples(rows: list[Row], ids: list[int], with_text: bool) -> list[list]:
    """SGLang's ``[logprob, token_id, text]`` entries (text only when asked)."""
    return [[r[0], t, token_text(t) if with_text else None] for r, t in zip(rows, ids)]


def top_triples(rows: list[Row], with_text: bool) -> list[list[list]]:
    return [[[v, t, token_text(t) if with_text else None] for v, t in r[1]] for r in rows]


def native_meta(prompt: list[int], in_rows: list[Row] | None, out: list[int], out_rows: list[Row], top: int,
                start: int, with_text: bool) -> dict:
    """The meta_info logprob fields of /generate from prompt position ``start`` (-1 or a PD decode without
    prompt rows: output only)."""
    n = len(prompt)
    start = n if start < 0 or in_rows is None else min(start, n)
    in_lp = [[None, prompt[0], token_text(prompt[0]) if with_text else None]] if start == 0 else []
    first = max(start, 1)
    in_lp += triples((in_rows or [])[first - 1:], prompt[first:], with_text)
    meta = {"input_token_logprobs": in_lp, "output_token_logprobs": triples(out_rows, out, with_text)}
    if top:
        in_top = [None] if start == 0 else []
        meta["input_top_logprobs"] = in_top + top_triples((in_rows or [])[first - 1:], with_text)
        meta["output_top_logprobs"] = top_triples(out_rows, with_text)
    return meta
