"""The mock engine's KV cache: paged blocks, prefix reuse by chained block hashes, LRU eviction.

A block holds ``block_size`` tokens and is named by a hash chained from its parent's hash and its own
token ids, so equal hashes mean equal prefixes (as in SGLang's paged radix cache and vLLM's prefix cache).
Only full blocks are cached. A request references the blocks of its matched prefix while it runs; only
unreferenced leaf blocks are evicted, least recently used first (a parent is never evicted before its
children, so every cached block stays reachable). Like SGLang, at least one prompt token is always
computed: a fully cached prompt reuses all blocks but the one holding its last token.

Capacity comes from the modelled GPU memory: (memory x mem-fraction-static - weights) / KV bytes per
token, in blocks. ``--num-gpu-blocks`` (dynamo.mocker's flag) or ``--max-total-tokens`` (SGLang's) set it
directly; ``--page-size`` or ``--block-size`` set the block size. ``--disable-radix-cache`` turns it off.
Unlike SGLang the model is off unless one of CACHE_FLAGS is given (see below).

Every change is reported to ``publish`` as a list of events (see kv_events.py for the wire format):
("stored", hashes, parent_hash, token_ids), ("removed", hashes), ("cleared",).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from hashlib import blake2b
from typing import Any, Callable

DEFAULT_BLOCK_SIZE = 16          # SGLang's default page size is 1; 16 keeps hashing off the mock's hot path
GPU_MEMORY_BYTES = 80 * 2**30    # the modelled GPU (an 80 GB part)
WEIGHT_BYTES = 16 * 2**30        # the modelled weights (an 8B model in bf16)
KV_BYTES_PER_TOKEN = 128 * 1024  # 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes
DEFAULT_MEM_FRACTION = 0.88

# Any of these flags turns the cache model on (without them, the mock prefills every prompt token, which
# keeps the timing model's figures exact for tests and benchmarks that do not study reuse).
CACHE_FLAGS = ("page_size", "block_size", "num_gpu_blocks", "max_total_tokens", "kv_events_config",
               "enable_cache_report")

Event = tuple
Publish = Callable[[list[Event]], None]


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """The signed 64-bit hash of a block: its parent's hash chained with its token ids."""
    h = blake2b(digest_size=8)
    h.update(b"root" if parent is None else parent.to_bytes(8, "little", signed=True))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def chain_hashes(ids: list[int], block_size: int, limit: int | None = None) -> list[int]:
    """Hashes of the full blocks of ``ids`` (of the first ``limit`` tokens when given)."""
    n = len(ids) if limit is None else min(limit, len(ids))
    out: list[int] = []
    parent = None
    for start in range(0, n - block_size + 1, block_size):
        parent = block_hash(parent, ids[start:start + block_size])
        out.append(parent)
    return out


class _Block:
    __slots__ = ("parent", "refs", "children")

    def __init__(self, parent: int | None) -> None:
        self.parent = parent
        self.refs = 0
        self.children = 0


class Lease:
    """The blocks one running request holds, and how many of its prompt tokens were cached."""

    __slots__ = ("held", "cached_tokens")

    def __init__(self, held: list[int], cached_tokens: int) -> None:
        self.held = held
        self.cached_tokens = cached_tokens


class KVCache:
    def __init__(self, block_size: int, num_blocks: int, publish: Publish | None = None) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError("the KV cache needs a block size and a capacity of at least 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.publish = publish
        self.blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.hit_tokens = 0
        self.query_tokens = 0
        self.evicted_blocks = 0

    @property
    def used_blocks(self) -> int:
        return len(self.blocks)

    def match(self, ids: list[int]) -> int:
        """Cached prompt tokens for ``ids`` (no state change)."""
        n = 0
        for h in chain_hashes(ids, self.block_size, len(ids) - 1):
            if h not in self.blocks:
                break
            n += self.block_size
        return n

    def start(self, ids: list[int]) -> Lease:
        """Admit a prompt: reuse its cached prefix, store its other full blocks, hold them while it runs."""
        bs = self.block_size
        hashes = chain_hashes(ids, bs)
        reusable = (len(ids) - 1) // bs  # the block holding the last prompt token is always computed
        hit = 0
        while hit < min(reusable, len(hashes)) and hashes[hit] in self.blocks:
            hit += 1
        events: list[Event] = []
        held = self._store(ids, hashes, events)
        self._touch(held)
        for h in held:
            self.blocks[h].refs += 1
        self.query_tokens += len(ids)
        self.hit_tokens += hit * bs
        self._emit(events)
        return Lease(held, hit * bs)

    def finish(self, lease: Lease, ids: list[int]) -> None:
        """A request ended with ``ids`` (prompt plus output): cache its full blocks, release its hold."""
        for h in lease.held:
            b = self.blocks.get(h)
            if b is not None and b.refs > 0:
                b.refs -= 1
        lease.held = []
        events: list[Event] = []
        stored = self._store(ids, chain_hashes(ids, self.block_size), events)
        self._touch(stored)
        self._emit(events)

    def flush(self) -> None:
        """Drop every block (SGLang's /flush_cache); running requests keep computing without a hold."""
        self.blocks.clear()
        self._emit([("cleared",)])

    def _store(self, ids: list[int], hashes: list[int], events: list[Event]) -> list[int]:
        """Make the chain present as far as capacity allows; returns the hashes now cached, in order."""
        bs = self.block_size
        present: list[int] = []
        new: list[int] = []
        new_tokens: list[int] = []
        first_parent: int | None = None
        for i, h in enumerate(hashes):
            if h in self.blocks:
                if new:  # a cached block after a stored run: report the run, then go on
                    events.append(("stored", new, first_parent, new_tokens))
                    new, new_tokens = [], []
                present.append(h)
                continue
            if len(self.blocks) >= self.num_blocks and not self._evict_one(events, keep=present):
                break  # full of blocks in use: the rest of this prompt is computed but not cached
            parent = hashes[i - 1] if i else None
            self.blocks[h] = _Block(parent)
            if parent is not None:
                self.blocks[parent].children += 1
            if not new:
                first_parent = parent
            new.append(h)
            new_tokens.extend(ids[i * bs:(i + 1) * bs])
            present.append(h)
        if new:
            events.append(("stored", new, first_parent, new_tokens))
        return present

    def _touch(self, chain: list[int]) -> None:
        # children first, parents last: a parent is always at least as recent as its children
        for h in reversed(chain):
            if h in self.blocks:
                self.blocks.move_to_end(h)

    def _evict_one(self, events: list[Event], keep: list[int]) -> bool:
        keep_set = set(keep[-1:])  # the block the chain being stored hangs from must stay
        for h, b in self.blocks.items():
            if b.refs == 0 and b.children == 0 and h not in keep_set:
                del self.blocks[h]
                parent = self.blocks.get(b.parent) if b.parent is not None else None
                if parent is not None:
                    parent.children -= 1
                self.evicted_blocks += 1
                if events and events[-1][0] == "removed":
                    events[-1][1].append(h)
                else:
                    events.append(("removed", [h]))
                return True
        return False

    def _emit(self, events: list[Event]) -> None:
        if events and self.publish is not None:
            self.publish(events)

    def view(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "num_blocks": self.num_blocks, "used_blocks": len(self.blocks),
                "hit_tokens": self.hit_tokens, "query_tokens": self.query_tokens,
                "evicted_blocks": self.evicted_blocks}


def _num(extras: dict[str, Any], name: str, kind: type) -> Any:
    value = extras.get(name)
    if value is None or value is True:
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a number") from None


def capacity_blocks(extras: dict[str, Any], block_size: int) -> int:
    """Blocks of KV the modelled GPU holds, or the capacity set directly by flag."""
    blocks = _num(extras, "num_gpu_blocks", int)
    if blocks is not None:
        return blocks
    tokens = _num(extras, "max_total_tokens", int)
    if tokens is None:
        frac = _num(extras, "mem_fraction_static", float) or DEFAULT_MEM_FRACTION
        tokens = int((GPU_MEMORY_BYTES * frac - WEIGHT_BYTES) // KV_BYTES_PER_TOKEN)
    return max(tokens // block_size, 1)


def make_kvcache(cfg: Any, publish: Publish | None = None) -> KVCache | None:
    """The KV cache of a mock server configured by ``cfg`` (None on a PD decode server or when disabled)."""
    extras = cfg.extra_args
    if cfg.disaggregation_mode == "decode" or extras.get("disable_radix_cache"):
        return None
    if not any(extras.get(k) for k in CACHE_FLAGS):
        return None  # no KV flag given: the plain timing model (every prompt token prefilled)
    bs = _num(extras, "page_size", int) or _num(extras, "block_size", int) or DEFAULT_BLOCK_SIZE
    return KVCache(bs, capacity_blocks(extras, bs), publish)
