"""Load-balancing policies behind one interface, looked up by name in POLICIES.

A policy picks one worker from a non-empty list of healthy candidates; ``key`` is the request's prompt
text (only computed when ``needs_key``). ``forget`` is called when a worker leaves. ``kv_aware`` lives in
kv_policy.py (it routes on the engines' KV events).
"""

from __future__ import annotations

import random
from typing import Callable

from hpcserve.router.kv_policy import KVAware
from hpcserve.router.radix import PrefixTree
from hpcserve.router.workers import Worker


class Policy:
    name = ""
    needs_key = False

    def pick(self, workers: list[Worker], key: str | None) -> Worker:
        raise NotImplementedError

    def forget(self, worker: Worker) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name}


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, **_: object) -> None:
        self._next = 0

    def pick(self, workers: list[Worker], key: str | None) -> Worker:
        i = self._next
        self._next = i + 1
        return workers[i % len(workers)]


class Random(Policy):
    name = "random"

    def __init__(self, **_: object) -> None:
        pass

    def pick(self, workers: list[Worker], key: str | None) -> Worker:
        return workers[random.randrange(len(workers))]


class LeastLoad(Policy):
    """Fewest in-flight requests; ties rotate so an idle fleet is still spread evenly."""

    name = "least_load"

    def __init__(self, **_: object) -> None:
        self._start = 0

    def pick(self, workers: list[Worker], key: str | None) -> Worker:
        n = len(workers)
        if n == 1:
            return workers[0]
        start = self._start = (self._start + 1) % n
        best = workers[start]
        low = best.inflight
        for i in range(1, n):
            w = workers[(start + i) % n]
            if w.inflight < low:
                best, low = w, w.inflight
        return best


class PowerOfTwo(Policy):
    """Two random candidates, the less loaded one wins: near least_load balance without a full scan."""

    name = "power_of_two"

    def __init__(self, **_: object) -> None:
        pass

    def pick(self, workers: list[Worker], key: str | None) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = random.sample(workers, 2)
        return a if a.inflight <= b.inflight else b


class CacheAware(Policy):
    """Route to the worker holding the longest prefix of this prompt (its KV cache likely does too).

    If the load is imbalanced -- (max - min) in-flight > balance_abs_threshold AND max > min *
    balance_rel_threshold -- the least loaded worker wins instead. A match shorter than cache_threshold of
    the prompt counts as no match: the worker with the smallest share of the tree gets it.
    """

    name = "cache_aware"
    needs_key = True

    def __init__(self, *, cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.5, max_tree_chars: int = 8_000_000, **_: object) -> None:
        self.cache_threshold = cache_threshold
        self.abs_threshold = balance_abs_threshold
        self.rel_threshold = balance_rel_threshold
        self.tree = PrefixTree(max_tree_chars)
        self._least = LeastLoad()

    def pick(self, workers: list[Worker], key: str | None) -> Worker:
        if len(workers) == 1 or not key:
            chosen = workers[0] if len(workers) == 1 else self._least.pick(workers, None)
            if key:
                self.tree.insert(key, chosen.id)
            return chosen
        lo = hi = workers[0].inflight
        for w in workers:
            load = w.inflight
            if load < lo:
                lo = load
            elif load > hi:
                hi = load
        if hi - lo > self.abs_threshold and hi > lo * self.rel_threshold:
            chosen = self._least.pick(workers, None)
        else:
            by_id = {w.id: w for w in workers}
            matched, tenant = self.tree.match(key, by_id)
            if tenant is not None and matched > self.cache_threshold * len(key):
                chosen = by_id[tenant]
            else:
                sizes = self.tree.sizes
                chosen = min(workers, key=lambda w: (sizes.get(w.id, 0), w.inflight))
        self.tree.insert(key, chosen.id)
        return chosen

    def forget(self, worker: Worker) -> None:
        self.tree.remove_tenant(worker.id)

    def describe(self) -> dict:
        return {"name": self.name, "cache_threshold": self.cache_threshold,
                "balance_abs_threshold": self.abs_threshold, "balance_rel_threshold": self.rel_threshold,
                "tree_chars": self.tree.total_chars, "max_tree_chars": self.tree.max_chars}


POLICIES: dict[str, Callable[..., Policy]] = {
    p.name: p for p in (RoundRobin, Random, LeastLoad, PowerOfTwo, CacheAware, KVAware)
}


def make_policy(name: str, **options: object) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}") from None
    return factory(**options)


MAX_KEY_CHARS = 32_768


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _ids_text(ids: list) -> str:
    # One character per token id keeps prefix structure; ids past the Unicode range fold harmlessly.
    return "".join([chr(i % 0x110000) for i in ids if isinstance(i, int)])


def routing_key(body: dict) -> str:
    """The prompt as one string for prefix matching (first item of a batch), truncated to MAX_KEY_CHARS."""
    for field in ("text", "prompt"):
        v = body.get(field)
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, str):
            return v[:MAX_KEY_CHARS]
        if isinstance(v, list):  # a token id list (prompt) of a batch
            return _ids_text(v[:MAX_KEY_CHARS])
    msgs = body.get("messages")
    if isinstance(msgs, list):
        out = []
        size = 0
        for m in msgs:
            if isinstance(m, dict):
                s = f"{m.get('role', '')}\x1f{_content_text(m.get('content'))}\x1e"
                out.append(s)
                size += len(s)
                if size >= MAX_KEY_CHARS:
                    break
        return "".join(out)[:MAX_KEY_CHARS]
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids:
        if isinstance(ids[0], list):
            ids = ids[0]
        return _ids_text(ids[:MAX_KEY_CHARS])
    return ""
