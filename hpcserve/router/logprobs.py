"""PD prompt log-probabilities: the prefill server computed them, the decode server did not, so the router
puts the prefill's in front of the decode's (per item for batches, per choice for OpenAI ``n``).

Two wire formats carry them, one merger each, picked by ``wanted`` once per request:
- native /generate: ``meta_info.input_token_logprobs`` and ``input_top_logprobs``;
- /v1/completions with ``echo`` and ``logprobs``: the prompt's entries lead each choice's ``logprobs`` lists
  (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``). The prefill's prompt entries are those
  whose ``text_offset`` lies before the decode's first output token (the echoed prompt comes first).
Chat completions return no prompt log-probabilities, so they need nothing here.
"""

from __future__ import annotations

from typing import Callable

import orjson

NATIVE_KEYS = ("input_token_logprobs", "input_top_logprobs")
OAI_KEYS = ("tokens", "token_logprobs", "top_logprobs")


def _truthy(v: object) -> bool:
    """A batch field may be a list with one value per item: any true item asks for it."""
    return any(v) if isinstance(v, list) else bool(v)


class Native:
    @staticmethod
    def key(item: dict) -> int:
        idx = item.get("index", 0)
        return idx if isinstance(idx, int) else 0

    @staticmethod
    def has(item: dict) -> bool:
        m = item.get("meta_info")
        return isinstance(m, dict) and m.get("input_token_logprobs") is not None

    @staticmethod
    def items(doc: object) -> list:
        return doc if isinstance(doc, list) else [doc]

    @staticmethod
    def merge(prefill: object, decode: object) -> bool:
        if not isinstance(prefill, dict) or not isinstance(decode, dict):
            return False
        pm, dm = prefill.get("meta_info"), decode.get("meta_info")
        if not isinstance(pm, dict) or not isinstance(dm, dict):
            return False
        for k in NATIVE_KEYS:
            pl = pm.get(k)
            if isinstance(pl, list):
                dm[k] = pl + list(dm.get(k) or [])
        return True


class Completions:
    """OpenAI completions: one prefill entry per choice index; each choice merged once (its first event)."""

    @staticmethod
    def key(choice: dict) -> int:
        idx = choice.get("index", 0)
        return idx if isinstance(idx, int) else 0

    @staticmethod
    def has(choice: dict) -> bool:
        return isinstance(choice.get("logprobs"), dict)

    @staticmethod
    def items(doc: object) -> list:
        ch = doc.get("choices") if isinstance(doc, dict) else None
        return ch if isinstance(ch, list) else []

    @staticmethod
    def merge(prefill: object, decode: object) -> bool:
        if not isinstance(prefill, dict) or not isinstance(decode, dict):
            return False
        pl, dl = prefill.get("logprobs"), decode.get("logprobs")
        if not isinstance(pl, dict) or not isinstance(dl, dict):
            return False
        d_off, p_off = dl.get("text_offset") or [], pl.get("text_offset") or []
        if not d_off or not isinstance(d_off[0], int):
            return False
        cut = d_off[0]
        count = 0
        while count < len(p_off) and isinstance(p_off[count], int) and 0 <= p_off[count] < cut:
            count += 1
        if not count:
            return True
        dl["text_offset"] = p_off[:count] + d_off
        for k in OAI_KEYS:
            p, d = pl.get(k), dl.get(k)
            if isinstance(p, list) and isinstance(d, list) and (d or k != "top_logprobs"):
                dl[k] = p[:count] + d
        return True


def wanted(path: bytes, body: dict):
    """The merger a PD request needs, or None (the common case: one or two dict lookups)."""
    if path == b"/generate":
        return Native if _truthy(body.get("return_logprob")) else None
    if path == b"/v1/completions" and body.get("echo") and body.get("logprobs"):
        return Completions
    return None


def parse_prefill(fmt, body: bytes) -> dict[int, dict]:
    """The prefill's items by index from a JSON body or an SSE stream (the first event carrying logprobs)."""
    body = body.strip()
    found: dict[int, dict] = {}
    if body.startswith(b"data:"):
        for event in body.split(b"\n\n"):
            data = event.strip()[5:].strip()
            if not data.startswith(b"{"):
                continue
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            for item in fmt.items(doc):
                if isinstance(item, dict) and fmt.has(item):
                    found.setdefault(fmt.key(item), item)
        return found
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return found
    items = fmt.items(doc)
    if fmt is Native:  # a batch answer is a list in order; a single one has no index
        return {i: item for i, item in enumerate(items)}
    return {fmt.key(item): item for item in items if isinstance(item, dict)}


def merge_body(fmt, prefill: dict[int, dict], decode_body: bytes) -> bytes:
    try:
        doc = orjson.loads(decode_body)
    except orjson.JSONDecodeError:
        return decode_body
    items = fmt.items(doc)
    for i, item in enumerate(items):
        if isinstance(item, dict):
            fmt.merge(prefill.get(i if fmt is Native else fmt.key(item)), item)
    return orjson.dumps(doc)


class SseMerger:
    """A stream sink that merges the prefill's prompt log-probabilities into the decode's first event of
    each item or choice (native decode servers repeat the empty prompt lists in every event: each one)."""

    def __init__(self, fmt, prefill: dict[int, dict], out: Callable[[bytes], None]) -> None:
        self.fmt = fmt
        self.prefill = prefill
        self.out = out
        self.buf = b""
        self.merged: set[int] = set()

    def __call__(self, data: bytes) -> None:
        self.buf += data
        *events, self.buf = self.buf.split(b"\n\n")
        if events:
            self.out(b"".join(self._merge(e) + b"\n\n" for e in events))

    def _merge(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {"):
            return event
        try:
            doc = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        fmt, changed = self.fmt, False
        for item in fmt.items(doc):
            if not isinstance(item, dict) or not fmt.has(item):
                continue
            idx = fmt.key(item)
            if fmt is Completions and idx in self.merged:
                continue
            if fmt.merge(self.prefill.get(idx), item):
                self.merged.add(idx)
                changed = True
        return b"data: " + orjson.dumps(doc) if changed else event

    def flush(self) -> None:
        if self.buf:
            self.out(self.buf)
            self.buf = b""
