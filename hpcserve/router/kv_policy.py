"""Policy ``kv_aware``: route on the workers' own KV events, weighing cached prefix against load.

For each candidate worker w, with the prompt cut into B blocks of ``block_size`` tokens:

    overlap(w)  = leading prompt blocks w holds, from KVIndex (0 while w's events are not live or stale)
    load(w)     = uncached blocks of the requests the router sent to w that are still in flight
    inflight(w) = how many those are
    cost(w)     = overlap_weight * (B - overlap(w)) + load(w) + request_weight * inflight(w)

and the lowest cost wins (ties rotate). This is the shape of the cost Dynamo's KV router minimises
(blocks to prefill, weighted by ``--kv-overlap-weight``, plus the load of running requests), with the
load counted as the blocks each in-flight request added to its worker (its uncached part): requests that
share a cached prefix share its blocks, so co-locating them costs only their own tails. Each running
request also costs ``request_weight`` blocks (Dynamo's decode_active_request_weight): without it, chat
sessions whose histories are cached cost their worker almost nothing and all pile onto one worker. The
defaults (4 and 64) were chosen on perf/kv_routing.py (docs/kv-routing.md). The books are trimmed to the
worker's in-flight count, oldest first, so no completion hook is needed.

The prompt's blocks a worker does not hold yet are predicted on it once it is picked (KVIndex.predict)
for ``predict_ttl`` seconds or until its events confirm them, so that requests arriving together with a
new shared prefix follow the first one instead of each computing the prefix elsewhere.

A worker counts as stale, and is scored on load only, when ``stale_after`` requests that should have
stored new blocks went to it without any event arriving from it (its event stream is not reaching us).

Tokenization: a model directory's tokenizer.json through the ``tokenizers`` package (option
``kv_tokenizer``), else the mock's byte tokenizer; chat routing keys are rendered with the mock's template.
"""

from __future__ import annotations

import time
from collections import deque

from hpcserve.router.kv_feed import Feeds
from hpcserve.router.kv_index import ByteCodec, IdCodec, KVIndex, prefix_hashes


ANCHOR = 16          # blocks between memoised points of a prompt's hash chain
MAX_ANCHORS = 8192


def chat_text(key: str) -> str:
    """A chat routing key (role \\x1f content \\x1e ...) in the mock's chat template."""
    parts = []
    for msg in key.split("\x1e"):
        if msg:
            role, _, content = msg.partition("\x1f")
            parts.append(f"<|{role}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


class _Books:
    """In-flight requests the router sent to one worker: their uncached blocks, oldest first."""

    __slots__ = ("q", "prefill", "unanswered", "seen")

    def __init__(self) -> None:
        self.q: deque[int] = deque()
        self.prefill = 0
        self.unanswered = 0
        self.seen = 0

    def trim(self, inflight: int) -> None:
        q = self.q
        while len(q) > inflight:
            self.prefill -= q.popleft()

    def add(self, prefill: int) -> None:
        self.q.append(prefill)
        self.prefill += prefill


class KVAware:
    name = "kv_aware"
    needs_key = True

    def __init__(self, *, overlap_weight: float = 4.0, request_weight: float = 64.0,
                 kv_block_size: int | None = None, kv_tokenizer: str | None = None, stale_after: int = 16,
                 predict_ttl: float = 5.0, **_: object) -> None:
        self.overlap_weight = float(overlap_weight)
        self.predict_ttl = predict_ttl
        self.request_weight = float(request_weight)
        self.block_size = kv_block_size
        self.stale_after = stale_after
        self.codec = ByteCodec
        self._tok = None
        if kv_tokenizer:
            from tokenizers import Tokenizer  # only routers given a tokenizer need the package

            self._tok = Tokenizer.from_file(kv_tokenizer)
            self.codec = IdCodec
        self.index = KVIndex(self.codec)
        self.feeds = Feeds(self.index)
        self.books: dict[str, _Books] = {}
        self._start = 0
        self._anchors: dict[tuple[int, int], tuple[int, ...]] = {}
        self.picks = self.overlap_blocks = 0

    def hashes(self, data: bytes, bs: int) -> list[int]:
        """``prefix_hashes`` of a prompt, resuming from the longest memoised anchor (every ANCHOR blocks):
        prompts that extend or share an earlier prompt's prefix (chat history, system prompts) hash only
        their new part plus one C-speed hash per probed anchor."""
        width = self.codec.width
        step = bs * width
        span = step * ANCHOR
        memo = self._anchors
        end = len(data) // span * span
        pos, parent, out = 0, None, []
        while end > 0:
            got = memo.get((end, hash(data[:end])))
            if got is not None:
                pos, out = end, list(got)
                parent = out[-1]
                break
            end -= span
        rest = prefix_hashes(data[pos:], bs, width, parent)
        out.extend(rest)
        for a in range(pos + span, len(out) * step + 1, span):
            if len(memo) >= MAX_ANCHORS:
                memo.pop(next(iter(memo)))  # oldest first
            memo[(a, hash(data[:a]))] = tuple(out[:a // step])
        return out

    def pack(self, key: str) -> bytes:
        text = chat_text(key) if "\x1e" in key else key
        if self._tok is not None:
            return IdCodec.pack(self._tok.encode(text, add_special_tokens=False).ids)
        return text.encode("utf-8", "surrogatepass")

    def _block_size(self) -> int | None:
        if self.block_size is None:
            for f in self.feeds.feeds.values():
                if f.block_size:
                    self.block_size = int(f.block_size)
                    break
        return self.block_size

    def _live(self, wid: str, books: _Books) -> bool:
        feed = self.feeds.feeds.get(wid)
        if feed is None or feed.state != "live":
            return False
        if feed.batches != books.seen:
            books.seen, books.unanswered = feed.batches, 0
        return books.unanswered < self.stale_after

    def pick(self, workers: list, key: str | None):
        feeds, all_books = self.feeds, self.books
        index = self.index
        now = time.monotonic()
        if index.due:
            index.expire(now)
        live: set[str] = set()
        for w in workers:
            b = all_books.get(w.id)
            if b is None:
                b = all_books[w.id] = _Books()
            if w.id not in feeds.feeds:
                feeds.ensure(w)
            b.trim(w.inflight)
            if self._live(w.id, b):
                live.add(w.id)
        bs = self._block_size() or 16
        width = self.codec.width
        data = self.pack(key) if key else b""
        n_tokens = len(data) // width
        total = -(-n_tokens // bs)
        overlap: dict[str, int] = {}
        chain: list[int] = []
        if live and n_tokens > bs:
            reusable = (n_tokens - 1) // bs * bs * width  # the last prompt token is always computed
            chain = self.hashes(data[:reusable], bs)
            overlap = index.match(chain, live)
        n = len(workers)
        start = self._start = (self._start + 1) % n
        best = None
        best_cost = 0.0
        weight, per_request = self.overlap_weight, self.request_weight
        for i in range(n):
            w = workers[(start + i) % n]
            b = all_books[w.id]
            cost = weight * (total - overlap.get(w.id, 0)) + b.prefill + per_request * len(b.q)
            if best is None or cost < best_cost:
                best, best_cost = w, cost
        hit = overlap.get(best.id, 0)
        if hit < len(chain) and best.id in live and self.predict_ttl > 0:
            index.predict(best.id, chain[hit:], now + self.predict_ttl)
        b = all_books[best.id]
        b.add(total - hit)
        if total - hit > 0:
            b.unanswered += 1
        self.picks += 1
        self.overlap_blocks += hit
        return best

    def forget(self, worker) -> None:
        self.books.pop(worker.id, None)
        self.feeds.drop(worker.id)

    def describe(self) -> dict:
        return {"name": self.name, "overlap_weight": self.overlap_weight,
                "request_weight": self.request_weight, "block_size": self.block_size,
                "stale_after": self.stale_after, "predict_ttl": self.predict_ttl,
                "indexed_blocks": len(self.index.owners), "predicted_blocks": self.index.predicted_blocks,
                "picks": self.picks, "overlap_blocks": self.overlap_blocks,
                "feeds": {wid: f.view() for wid, f in self.feeds.feeds.items()}}
