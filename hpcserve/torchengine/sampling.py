"""Sampling and the single-process reference generation (the oracle the servers are checked against).

Sampling at output position i uses a generator seeded from (seed, i), so a decode server that continues a
prefill's sequence draws exactly what one process would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcserve.engine_shell.tokenizer import EOS_ID
from hpcserve.torchengine.model import KVCache, TinyLlama


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def from_dict(cls, d: dict | None, default_max_tokens: int, default_seed: int) -> "Sampling":
        """SGLang's sampling_params; other knobs (top_k, penalties, stop strings) are accepted and ignored."""
        d = d or {}
        if not isinstance(d, dict):
            raise ValueError("sampling_params must be an object")
        mnt = d.get("max_new_tokens")
        mnt = default_max_tokens if mnt is None else mnt
        temp = float(d.get("temperature", 1.0) if d.get("temperature") is not None else 1.0)
        top_p = float(d.get("top_p") if d.get("top_p") is not None else 1.0)
        seed = d.get("sampling_seed", d.get("seed"))
        stops = d.get("stop_token_ids") or ()
        if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 0:
            raise ValueError("max_new_tokens must be a non-negative integer")
        if temp < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, int) for s in stops):
            raise ValueError("stop_token_ids must be a list of integers")
        return cls(mnt, temp, top_p, default_seed if seed is None else int(seed), tuple(stops),
                   bool(d.get("ignore_eos", False)))

    def stops(self, token: int) -> bool:
        return token in self.stop_token_ids or (token == EOS_ID and not self.ignore_eos)

    def to_dict(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos}


def sample(logits: torch.Tensor, sp: Sampling, index: int) -> int:
    """Token for output position ``index`` (0 = the token the prefill produces)."""
    if sp.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / sp.temperature, -1)
    if sp.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < sp.top_p   # smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    g = torch.Generator().manual_seed((sp.seed * 1_000_003 + index) % (2 ** 63))
    return int(torch.multinomial(probs, 1, generator=g))


def prefill(model: TinyLlama, prompt: list[int], sp: Sampling) -> tuple[int, KVCache]:
    """First output token and the prompt's KV cache."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    logits, cache = model(prompt, 0, None)
    return sample(logits, sp, 0), cache


def decode(model: TinyLlama, prompt_len: int, first: int, cache: KVCache, sp: Sampling) -> list[int]:
    """Continue after the first token until max_new_tokens or a stop token; returns all output tokens."""
    out = [first]
    while len(out) < sp.max_new_tokens and not sp.stops(out[-1]):
        logits, cache = model([out[-1]], prompt_len + len(out) - 1, cache)
        out.append(sample(logits, sp, len(out)))
    return out


def generate(model: TinyLlama, prompt: list[int], max_new_tokens: int = 16, temperature: float = 0.0,
             seed: int = 0, **kw) -> list[int]:
    """The reference: one process, prefill then decode with the KV cache."""
    return generate_with(model, prompt, Sampling(max_new_tokens, temperature, seed=seed, **kw))


def generate_with(model: TinyLlama, prompt: list[int], sp: Sampling) -> list[int]:
    if sp.max_new_tokens == 0:
        return []
    first, cache = prefill(model, prompt, sp)
    return decode(model, len(prompt), first, cache, sp)


def generate_uncached(model: TinyLlama, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """Greedy without a KV cache (the whole sequence recomputed every step): checks the cache itself."""
    ids, out = list(prompt), []
    sp = Sampling(max_new_tokens, ignore_eos=ignore_eos)
    while len(out) < max_new_tokens and not (out and sp.stops(out[-1])):
        logits, _ = model(ids, 0, None)
        out.append(int(torch.argmax(logits)))
        ids.append(out[-1])
    return out
