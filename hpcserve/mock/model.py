"""The mock's "model": deterministic outputs, fake logprobs, the prompt's "KV" and the timing formulas.

Output tokens are a pure function of the prompt's token ids and the sampling parameters that matter
(temperature, top_p, seed; max_new_tokens only truncates, so a longer request extends a shorter one).
Greedy sampling (temperature 0) ignores seed and top_p, as a real engine does. The text is lowercase
words separated by spaces, one token per byte.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

from hpcserve.engine_shell.tokenizer import OFFSET, Prompt, token_text

WORDS = (
    "alpha", "bravo", "cedar", "delta", "ember", "fable", "gamma", "harbor", "iris", "jade", "kite", "lumen",
    "maple", "nova", "opal", "pixel", "quartz", "river", "sierra", "tango", "umber", "vivid", "willow", "xenon",
    "yarrow", "zephyr", "amber", "basil", "comet", "dune", "echo", "fern", "glade", "haze", "ivory", "juniper",
    "karma", "lotus", "meadow", "nectar", "orbit", "prism", "quill", "raven", "sage", "tundra", "unity",
    "velvet", "wren", "yonder", "zinc", "atlas", "birch", "coral", "drift", "ether", "flint", "grove", "heron",
    "inlet", "jasper", "koala", "lilac", "mist",
)
_WORD_BYTES = tuple(w.encode() + b" " for w in WORDS)
_MASK = (1 << 64) - 1


class SamplingParams:
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "stop_token_ids", "min_new_tokens",
                 "ignore_eos", "tag")

    def __init__(self, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (), min_new_tokens: int = 0,
                 ignore_eos: bool = False):
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.stop = stop
        self.stop_token_ids = stop_token_ids
        self.min_new_tokens = min_new_tokens
        self.ignore_eos = ignore_eos
        # what selects the output stream besides the prompt; greedy ignores seed and top_p
        self.tag = b"greedy" if temperature == 0.0 else b"%r|%r|%r" % (temperature, top_p, seed)

    def sample(self, j: int) -> "SamplingParams":
        """The parameters of parallel sample j of a request with n > 1: sample 0 is the request itself,
        the others draw other streams unless decoding is greedy."""
        if j == 0 or self.temperature == 0.0:
            return self
        sp = SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.seed, self.stop,
                            self.stop_token_ids, self.min_new_tokens, self.ignore_eos)
        sp.tag += b"|sample%d" % j
        return sp

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, default_max_tokens: int) -> "SamplingParams":
        """SGLang's sampling_params dict; unknown knobs (top_k, penalties...) are accepted and ignored.

        Parsed objects are cached by the dict's items: load tests repeat the same few parameter sets.
        """
        d = d or {}
        if not isinstance(d, dict):
            raise ValueError("sampling_params must be an object")
        try:
            key = (default_max_tokens, *d.items())
            hit = _SP_CACHE.get(key)
        except TypeError:  # unhashable values (a stop list): parse every time
            return cls._parse(d, default_max_tokens)
        if hit is None:
            if len(_SP_CACHE) > 4096:
                _SP_CACHE.clear()
            hit = _SP_CACHE[key] = cls._parse(d, default_max_tokens)
        return hit

    @classmethod
    def _parse(cls, d: dict[str, Any], default_max_tokens: int) -> "SamplingParams":
        mnt = d.get("max_new_tokens")
        mnt = default_max_tokens if mnt is None else _int(mnt, "max_new_tokens", 0)
        temp = d.get("temperature")
        temp = 1.0 if temp is None else _num(temp, "temperature", 0.0)
        top_p = d.get("top_p")
        top_p = 1.0 if top_p is None else _num(top_p, "top_p", 0.0)
        if top_p == 0.0 or top_p > 1.0:
            raise ValueError("top_p must be in (0, 1]")
        seed = d.get("seed")
        seed = None if seed is None else _int(seed, "seed", None)
        stop = d.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,) if stop else ()
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stop = tuple(s for s in stop if s)
        else:
            raise ValueError("stop must be a string or a list of strings")
        sti = d.get("stop_token_ids") or ()
        if not isinstance(sti, (list, tuple)) or not all(isinstance(t, int) for t in sti):
            raise ValueError("stop_token_ids must be a list of integers")
        mnn = d.get("min_new_tokens")
        mnn = 0 if mnn is None else _int(mnn, "min_new_tokens", 0)
        return cls(mnt, temp, top_p, seed, stop, tuple(sti), mnn, bool(d.get("ignore_eos", False)))


_SP_CACHE: dict[tuple, SamplingParams] = {}


def _int(v: Any, name: str, lo: int | None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ValueError(f"{name} must be an integer")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}")
    return int(v)


def _num(v: Any, name: str, lo: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number")
    if v < lo:
        raise ValueError(f"{name} must be at least {lo:g}")
    return float(v)


def _stream_bytes(seed: int, n: int) -> bytes:
    """n bytes of the word stream for this seed (splitmix64, 6 bits per word)."""
    out = bytearray()
    x = seed
    while len(out) < n:
        x = (x + 0x9E3779B97F4A7C15) & _MASK
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
        for shift in range(0, 60, 6):
            out += _WORD_BYTES[(z >> shift) & 63]
            if len(out) >= n:
                break
    return bytes(out[:n])


class Completion:
    """A planned output: the token ids the engine will emit, the final text, and why it stops."""

    __slots__ = ("ids", "text", "finish_reason")

    def __init__(self, ids: list[int], text: str, finish_reason: dict[str, Any]):
        self.ids = ids
        self.text = text
        self.finish_reason = finish_reason

    @property
    def n_out(self) -> int:
        return len(self.ids)

    def text_upto(self, k: int) -> str:
        """Text after k emitted tokens (never shows a stop string that the final text trims)."""
        return self.text if k >= len(self.ids) else self.text[:k]


def complete(prompt: Prompt, sp: SamplingParams) -> Completion:
    n = sp.max_new_tokens
    if n == 0:
        return Completion([], "", {"type": "length", "length": 0})
    seed = int.from_bytes(blake2b(prompt.key + b"\0" + sp.tag, digest_size=8).digest(), "little")
    data = _stream_bytes(seed, n)
    text = data.decode("ascii")
    end, cut, matched = n, n, None
    for s in sp.stop:  # the earliest stop string ending at or after min_new_tokens wins
        i = text.find(s, max(0, sp.min_new_tokens - len(s)))
        if i >= 0 and (matched is None or i + len(s) < end):
            end, cut, matched = i + len(s), i, s
    for t in sp.stop_token_ids:  # a stop token counts as output but is not shown in the text
        b = t - OFFSET
        if 0 <= b < 256:
            limit = end if matched is None else end - 1
            i = data.find(bytes((b,)), max(0, sp.min_new_tokens - 1), limit)
            if i >= 0:
                end, cut, matched = i + 1, i, t
    ids = [b + OFFSET for b in data[:end]]
    if matched is None:
        return Completion(ids, text, {"type": "length", "length": n})
    return Completion(ids, text[:cut], {"type": "stop", "matched": matched})


def first_token(prompt: Prompt, sp: SamplingParams) -> int:
    if sp.max_new_tokens == 0:
        return -1
    one = SamplingParams(1, sp.temperature, sp.top_p, sp.seed)
    return complete(prompt, one).ids[0]


def kv_digest(prompt: Prompt, first: int) -> str:
    """What the prefill hands to the decode: a digest of the prompt's ids plus the first sampled token."""
    h = blake2b(prompt.key, digest_size=12)
    h.update(b"|%d" % first)
    return h.hexdigest()


def _logprob(token: int, pos: int) -> float:
    return -((token * 2654435761 + pos * 40503) % 1000) / 250.0


def input_logprobs(prompt: Prompt, with_text: bool, start: int = 0) -> list[list[Any]]:
    """Prompt logprobs from position ``start`` (position 0 has none: nothing comes before it)."""
    ids = prompt.ids
    return [[None if i == 0 else _logprob(t, i), t, token_text(t) if with_text else None]
            for i, t in enumerate(ids[start:], start)]


def output_logprobs(ids: list[int], start: int, with_text: bool) -> list[list[Any]]:
    return [[_logprob(t, 100000 + start + i), t, token_text(t) if with_text else None]
            for i, t in enumerate(ids[start:])]


def _alternatives(token: int, lp: float, n: int, with_text: bool) -> list[list[Any]]:
    """The n most likely tokens at a position: the emitted one first, then less likely printable bytes."""
    out = [[lp, token, token_text(token) if with_text else None]]
    seen = {token}
    k = 0
    while len(out) < n and k < 300:
        k += 1
        alt = OFFSET + 32 + (token + 7 * k) % 95
        if alt not in seen:
            seen.add(alt)
            out.append([round(lp - 0.375 * len(out), 6), alt, token_text(alt) if with_text else None])
    return out


def input_top_logprobs(prompt: Prompt, n: int, with_text: bool, start: int = 0) -> list[list[list[Any]] | None]:
    return [None if lp is None else _alternatives(t, lp, n, with_text)
            for lp, t, _ in input_logprobs(prompt, False, start)]


def output_top_logprobs(ids: list[int], start: int, n: int, with_text: bool) -> list[list[list[Any]]]:
    return [_alternatives(t, lp, n, with_text) for lp, t, _ in output_logprobs(ids, start, False)]


def prefill_ms(cfg: Any, n_tokens: int) -> float:
    return cfg.prefill_base_ms + cfg.prefill_per_token_ms * n_tokens


def decode_step_ms(cfg: Any, batch: int) -> float:
    return cfg.decode_step_ms + cfg.decode_step_per_seq_ms * batch
