"""PD ``return_logprob``: the prefill server computed the prompt's logprobs, the decode server did not, so
the prefill's ``meta_info.input_token_logprobs`` is prepended to the decode's (per item for batches)."""

from __future__ import annotations

from typing import Callable

import orjson


def _merge_item(prefill: object, decode: object) -> None:
    if not isinstance(prefill, dict) or not isinstance(decode, dict):
        return
    pl = (prefill.get("meta_info") or {}).get("input_token_logprobs")
    dm = decode.get("meta_info")
    if isinstance(pl, list) and isinstance(dm, dict):
        dm["input_token_logprobs"] = pl + list(dm.get("input_token_logprobs") or [])


def _items(doc: object) -> list:
    return doc if isinstance(doc, list) else [doc]


def parse_prefill(body: bytes) -> list:
    """Prefill output items from a JSON body or an SSE stream (last event per index carrying logprobs)."""
    body = body.strip()
    if body.startswith(b"data:"):
        found: dict[int, dict] = {}
        for event in body.split(b"\n\n"):
            data = event.strip()[5:].strip()
            if not data.startswith(b"{"):
                continue
            try:
                item = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if (item.get("meta_info") or {}).get("input_token_logprobs") is not None:
                found[item.get("index", 0) if isinstance(item.get("index"), int) else 0] = item
        return [found[i] for i in sorted(found)]
    try:
        return _items(orjson.loads(body))
    except orjson.JSONDecodeError:
        return []


def merge_body(prefill_items: list, decode_body: bytes) -> bytes:
    try:
        doc = orjson.loads(decode_body)
    except orjson.JSONDecodeError:
        return decode_body
    for p, d in zip(prefill_items, _items(doc)):
        _merge_item(p, d)
    return orjson.dumps(doc)


class SseMerger:
    """A stream sink that merges prefill logprobs into each decode SSE event (only when asked for)."""

    def __init__(self, prefill_items: list, out: Callable[[bytes], None]) -> None:
        self.prefill = prefill_items
        self.out = out
        self.buf = b""

    def __call__(self, data: bytes) -> None:
        self.buf += data
        *events, self.buf = self.buf.split(b"\n\n")
        if events:
            self.out(b"".join(self._merge(e) + b"\n\n" for e in events))

    def _merge(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {"):
            return event
        try:
            item = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        idx = item.get("index", 0)
        if isinstance(idx, int) and 0 <= idx < len(self.prefill):
            _merge_item(self.prefill[idx], item)
        return b"data: " + orjson.dumps(item)

    def flush(self) -> None:
        if self.buf:
            self.out(self.buf)
            self.buf = b""
