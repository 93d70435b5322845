"""The router's index of which worker holds which KV blocks, built from the engines' KV events.

Engines name blocks with their own hashes (SGLang, vLLM and the mock each hash differently), so the index
does not trust them for matching: a BlockStored event carries the blocks' token ids, and the index names
each block by its own chained hash of those tokens (``prefix_hashes``), which the router can also compute
from a request's prompt. Per worker it keeps engine hash -> own hash, so BlockRemoved (engine hashes only)
can be applied. ``match`` walks a prompt's chain and returns, per candidate worker, how many leading
blocks it holds.

Predictions: when the router sends a prompt to a worker, ``predict`` marks the prompt's blocks as held
there before the worker's events say so (it is computing them), for ``ttl`` seconds unless an event
confirms them. Without this, requests that arrive together with a new shared prefix (a burst of users of
one system prompt) all look uncached everywhere and spread over every worker, each computing the prefix
(Dynamo's router has the same option, ``--router-predicted-ttl-secs``).
"""

from __future__ import annotations

from array import array
from collections import deque

BYTE_OFFSET = 3  # the mock's byte tokenizer: token id = byte + 3


class ByteCodec:
    """Tokens of the mock's byte tokenizer as the bytes they stand for (1 byte per token)."""

    width = 1

    @staticmethod
    def pack(ids: list[int]) -> bytes:
        return bytes((i - BYTE_OFFSET) & 0xFF for i in ids)


class IdCodec:
    """Tokens of any other tokenizer as 4-byte ids."""

    width = 4

    @staticmethod
    def pack(ids: list[int]) -> bytes:
        return array("I", [i & 0xFFFFFFFF for i in ids]).tobytes()


def prefix_hashes(data: bytes, block_size: int, width: int = 1, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of packed tokens (``width`` bytes per token).

    Python's own 64-bit hash of (parent, block bytes): SipHash in C, about twenty times cheaper than a
    blake2b per block, which keeps the per-request cost near cache_aware's. These names never leave the
    router process, so the per-process hash seed does not matter."""
    step = block_size * width
    prev = 0 if parent is None else parent
    out: list[int] = []
    append = out.append
    for start in range(0, len(data) - step + 1, step):
        prev = hash((prev, data[start:start + step]))
        append(prev)
    return out


class KVIndex:
    """Own block hash -> bit mask of the workers holding it (one bit per worker id), so that one lookup per
    block answers for every worker."""

    def __init__(self, codec=ByteCodec) -> None:
        self.codec = codec
        self.owners: dict[int, int] = {}                # own block hash -> mask of workers holding it
        self.by_worker: dict[str, dict[int, int]] = {}  # worker -> engine hash -> own hash
        self.bits: dict[str, int] = {}                  # worker -> its bit (kept for the worker id's life)
        self.held: dict[str, set[int]] = {}             # worker -> own hashes its events confirmed
        self.pending: dict[str, dict[int, int]] = {}    # worker -> predicted own hash -> predictions open
        self.due: deque[tuple[float, str, int, list[int]]] = deque()  # (expiry, worker, generation, hashes)
        self.gen: dict[str, int] = {}                   # worker -> generation (a clear voids older predictions)
        self.orphans = 0                                 # stored blocks whose parent we never saw
        self.predicted_blocks = 0

    def blocks(self, wid: str) -> int:
        return len(self.by_worker.get(wid, ()))

    def bit(self, wid: str) -> int:
        b = self.bits.get(wid)
        if b is None:
            b = self.bits[wid] = 1 << len(self.bits)
        return b

    def stored(self, wid: str, engine_hashes: list[int], parent: int | None, token_ids: list[int],
               block_size: int) -> None:
        mine = self.by_worker.setdefault(wid, {})
        own_parent = None
        if parent is not None:
            own_parent = mine.get(parent)
            if own_parent is None:  # its prefix is unknown here (missed events): it can never be matched
                self.orphans += len(engine_hashes)
                return
        bit = self.bit(wid)
        owners = self.owners
        held = self.held.setdefault(wid, set())
        data = self.codec.pack(token_ids[:len(engine_hashes) * block_size])
        for eh, oh in zip(engine_hashes, prefix_hashes(data, block_size, self.codec.width, own_parent)):
            mine[eh] = oh
            held.add(oh)
            owners[oh] = owners.get(oh, 0) | bit

    def removed(self, wid: str, engine_hashes: list[int]) -> None:
        mine = self.by_worker.get(wid)
        if not mine:
            return
        bit = self.bits[wid]
        held = self.held.get(wid, set())
        for eh in engine_hashes:
            oh = mine.pop(eh, None)
            if oh is not None:
                held.discard(oh)
                self._drop(oh, bit)

    def clear(self, wid: str) -> None:
        """The worker's cache is empty (AllBlocksCleared, restart, unrecoverable gap) or it left."""
        mine = self.by_worker.pop(wid, None)
        self.held.pop(wid, None)
        pending = self.pending.pop(wid, None)
        self.gen[wid] = self.gen.get(wid, 0) + 1
        bit = self.bits.get(wid, 0)
        for oh in (mine or {}).values():
            self._drop(oh, bit)
        for oh in pending or ():
            self._drop(oh, bit)

    def predict(self, wid: str, hashes: list[int], expires: float) -> None:
        """``wid`` is about to compute these blocks: count them as held there until ``expires`` (a
        ``time.monotonic()`` value) unless its events confirm them by then."""
        if not hashes:
            return
        bit = self.bit(wid)
        owners = self.owners
        pending = self.pending.setdefault(wid, {})
        for oh in hashes:
            owners[oh] = owners.get(oh, 0) | bit
            pending[oh] = pending.get(oh, 0) + 1
        self.predicted_blocks += len(hashes)
        self.due.append((expires, wid, self.gen.get(wid, 0), hashes))

    def expire(self, now: float) -> None:
        """Withdraw the predictions due by ``now`` that no event confirmed (cheap when none is due)."""
        due = self.due
        while due and due[0][0] <= now:
            _, wid, gen, hashes = due.popleft()
            if gen != self.gen.get(wid, 0):
                continue  # the worker was cleared since: its predictions went with it
            pending = self.pending.get(wid, {})
            held = self.held.get(wid, ())
            bit = self.bits[wid]
            for oh in hashes:
                left = pending.get(oh, 0) - 1
                if left > 0:
                    pending[oh] = left
                    continue
                pending.pop(oh, None)
                if oh not in held:
                    self._drop(oh, bit)

    def _drop(self, oh: int, bit: int) -> None:
        m = self.owners.get(oh, 0) & ~bit
        if m:
            self.owners[oh] = m
        else:
            self.owners.pop(oh, None)

    def match(self, hashes: list[int], candidates: set[str]) -> dict[str, int]:
        """Leading blocks of ``hashes`` held by each candidate (absent = 0).

        A worker's blocks are prefix-closed here: a stored block whose parent is unknown is not indexed,
        and engines evict leaves first (SGLang's radix cache and the mock do), so a worker that holds
        block i holds every block before it. That makes the answer a binary search per candidate,
        O(log B) lookups instead of a walk over the whole chain. An engine evicting a parent before its
        children would make this overestimate that worker's overlap until the children go too."""
        out: dict[str, int] = {}
        n = len(hashes)
        if not n:
            return out
        get, bits = self.owners.get, self.bits
        first, last = get(hashes[0], 0), get(hashes[-1], 0)
        for wid in candidates:
            b = bits.get(wid, 0)
            if not b & first:
                continue
            if b & last:
                out[wid] = n
                continue
            lo, hi = 1, n - 1  # hashes[:lo] held, hashes[hi] not: the answer is in [lo, hi]
            while lo < hi:
                mid = (lo + hi) >> 1
                if get(hashes[mid], 0) & b:
                    lo = mid + 1
                else:
                    hi = mid
            out[wid] = lo
        return out
