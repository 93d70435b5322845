"""Byte-level tokenizer and chat template: token id = UTF-8 byte + OFFSET, nothing to download.

A prompt keeps its canonical bytes (``key``) so that the same token sequence given as text or as
input_ids hashes the same, without building id lists on the hot path.
"""

from __future__ import annotations

from array import array
from typing import Any

OFFSET = 3            # ids 0..2 are pad, bos, eos (never produced)
EOS_ID = 2
VOCAB_SIZE = 256 + OFFSET


class Prompt:
    """One tokenized prompt. ``key`` is the canonical byte string of its token ids."""

    __slots__ = ("key", "n_tokens", "_ids", "_text")

    def __init__(self, key: bytes, n_tokens: int, ids: list[int] | None = None, text: str | None = None):
        self.key = key
        self.n_tokens = n_tokens
        self._ids = ids
        self._text = text

    @classmethod
    def from_text(cls, text: str) -> "Prompt":
        data = text.encode("utf-8", "surrogatepass")
        return cls(data, len(data), text=text)

    @classmethod
    def from_ids(cls, ids: list[int]) -> "Prompt":
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("input_ids must be a list of integers")
        if all(OFFSET <= i < VOCAB_SIZE for i in ids):
            return cls(bytes(i - OFFSET for i in ids), len(ids), ids=list(ids))
        # ids outside the byte range (another tokenizer's ids): a key that no text can produce
        return cls(b"\xff\xfe" + array("q", ids).tobytes(), len(ids), ids=list(ids))

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            self._ids = [b + OFFSET for b in self.key]
        return self._ids

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = decode(self.ids)
        return self._text


def encode(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode("utf-8", "surrogatepass")]


def decode(ids: list[int]) -> str:
    return bytes(i - OFFSET for i in ids if OFFSET <= i < VOCAB_SIZE).decode("utf-8", "replace")


def token_text(token_id: int) -> str:
    return decode([token_id])


def token_piece(token_id: int) -> str:
    """A token as the completions API spells it: lossless, a lone non-UTF-8 byte as its latin-1 character
    (SGLang's _lossless_token_text for byte-level tokenizers)."""
    return chr(token_id - OFFSET) if OFFSET <= token_id < VOCAB_SIZE else ""


def token_bytes(token_id: int) -> list[int]:
    """The chat API's ``bytes`` of a token: its raw byte."""
    return [token_id - OFFSET] if OFFSET <= token_id < VOCAB_SIZE else []


def _content_text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    raise ValueError("message content must be a string or a list of content parts")


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Deterministic template: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("every message needs a string 'role'")
        parts.append(f"<|{m['role']}|>\n{_content_text(m.get('content'))}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
