"""The router's index of which worker holds which KV blocks, built from the engines' KV events.

Engines name blocks with their own hashes (SGLang, vLLM and the mock each hash differently), so the index
does not trust them for matching: a BlockStored event carries the blocks' token ids, and the index names
each block by its own chained hash of those tokens (``prefix_hashes``), which the router can also compute
from a request's prompt. Per worker it keeps engine hash -> own hash, so BlockRemoved (engine hashes only)
can be applied. ``match`` walks a prompt's chain and returns, per candidate worker, how many leading
blocks it holds.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from itertools import accumulate, repeat, takewhile
from operator import and_

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
    """Own block hash -> bit mask of the workers holding it (one bit per worker id): matching a prompt is
    then a running AND over the chain, done by C loops (map, accumulate, bisect) instead of set algebra."""

    def __init__(self, codec=ByteCodec) -> None:
        self.codec = codec
        self.owners: dict[int, int] = {}                # own block hash -> mask of workers holding it
        self.by_worker: dict[str, dict[int, int]] = {}  # worker -> engine hash -> own hash
        self.bits: dict[str, int] = {}                  # worker -> its bit (kept for the worker id's life)
        self.orphans = 0                                 # stored blocks whose parent we never saw

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
        data = self.codec.pack(token_ids[:len(engine_hashes) * block_size])
        for eh, oh in zip(engine_hashes, prefix_hashes(data, block_size, self.codec.width, own_parent)):
            mine[eh] = oh
            owners[oh] = owners.get(oh, 0) | bit

    def removed(self, wid: str, engine_hashes: list[int]) -> None:
        mine = self.by_worker.get(wid)
        if not mine:
            return
        bit = self.bits[wid]
        for eh in engine_hashes:
            oh = mine.pop(eh, None)
            if oh is not None:
                self._drop(oh, bit)

    def clear(self, wid: str) -> None:
        """The worker's cache is empty (AllBlocksCleared, restart, unrecoverable gap) or it left."""
        mine = self.by_worker.pop(wid, None)
        if mine:
            bit = self.bits[wid]
            for oh in mine.values():
                self._drop(oh, bit)

    def _drop(self, oh: int, bit: int) -> None:
        m = self.owners.get(oh, 0) & ~bit
        if m:
            self.owners[oh] = m
        else:
            self.owners.pop(oh, None)

    def match(self, hashes: list[int], candidates: set[str]) -> dict[str, int]:
        """Leading blocks of ``hashes`` held by each candidate (absent = 0)."""
        bits = self.bits
        mask = 0
        for wid in candidates:
            mask |= bits.get(wid, 0)
        if not mask or not hashes:
            return {}
        # running AND of the chain's masks, from the candidates' mask, until no candidate is left
        run = list(takewhile(bool, accumulate(map(self.owners.get, hashes, repeat(0, len(hashes))), and_,
                                              initial=mask)))
        out: dict[str, int] = {}
        if len(run) < 2:
            return out
        for wid in candidates:
            b = bits.get(wid, 0)
            if b & run[1]:
                # the running AND only loses bits: the first position without b ends b's prefix
                out[wid] = bisect_left(run, True, 1, len(run), key=lambda m, b=b: not m & b) - 1
        return out
