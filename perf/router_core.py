"""The router's own Python cost per request, without sockets: the real app, dispatcher, policies and HTTP
state machines, driven through in-memory transports. No kernel, no other process, so the number is stable
enough to compare two versions of the hot path (perf/router.py measures the whole thing over TCP).

    python perf/router_core.py [--requests 20000] [--repeats 5] [--stream] [--policies cache_aware,kv_aware]

Prints the best-of-repeats CPU microseconds per non-streaming (or streaming) PD request, with the same
router options perf/router.py uses (API key, limiter, least_load decode), once per prefill policy, and
kv_aware's cost relative to cache_aware's (goal: at most 1.5x). For kv_aware the prefill worker's KV index
is filled with the prompts' blocks first and its feed counts as live, so the cost includes hashing the
prompt and walking the index (no ZeroMQ traffic: events arrive off the request path).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router_fake import fake_answers, http_answer, load_requests  # noqa: E402

from hpcserve.http import HttpConnection, HttpServer  # noqa: E402
from hpcserve.http.upstream import UpstreamConn  # noqa: E402
from hpcserve.router.config import parse_args  # noqa: E402
from hpcserve.router.kv_feed import Feed  # noqa: E402
from hpcserve.router.kv_index import prefix_hashes  # noqa: E402
from hpcserve.router.main import build  # noqa: E402
from hpcserve.router.policies import routing_key  # noqa: E402

KEY = "core-bench-key"


class MemoryTransport(asyncio.Transport):
    """Collects what is written; the driver decides when the peer answers."""

    def __init__(self, on_write=None) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.on_write = on_write
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if self.on_write is not None:
            self.on_write(self)

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def warm_kv_index(policy, workers, reqs: list[bytes]) -> None:
    """Make kv_aware's index hold every request prompt on the (only) prefill worker, feed live."""
    import orjson

    policy.block_size = 16
    policy.stale_after = 1 << 60  # no events arrive here; the feeds must not turn stale
    for w in workers:
        feed = Feed(w.id, policy.index, "tcp://127.0.0.1:1", block_size=16)
        feed.state = "live"
        policy.feeds.feeds[w.id] = feed
    for raw in reqs:
        data = policy.pack(routing_key(orjson.loads(raw.partition(b"\r\n\r\n")[2])))
        hashes = prefix_hashes(data, 16)
        for w in workers:
            policy.index.stored(w.id, hashes, None, [b + 3 for b in data], 16)


def lengthen(reqs: list[bytes], chars: int) -> list[bytes]:
    """The same requests with a shared ``chars``-long system prompt in front of each text."""
    import orjson

    if chars <= 0:
        return reqs
    prefix = ("You are a careful assistant who answers in full sentences. " * (chars // 59 + 1))[:chars]
    out = []
    for raw in reqs:
        head, _, body = raw.partition(b"\r\n\r\n")
        doc = orjson.loads(body)
        doc["text"] = prefix + doc["text"]
        body = orjson.dumps(doc)
        head = b"\r\n".join(h if not h.startswith(b"content-length:") else b"content-length: %d" % len(body)
                             for h in head.split(b"\r\n"))
        out.append(head + b"\r\n\r\n" + body)
    return out


async def run(requests: int, repeats: int, stream: bool, policy: str = "cache_aware",
              prefix_chars: int = 0) -> list[float]:
    os.environ["CORE_BENCH_KEY"] = KEY
    ns = parse_args(["--mode", "pd", "--port", "0", "--prefill", "http://127.0.0.1:9", "8998",
                     "--decode", "http://127.0.0.1:10", "--prefill-policy", policy,
                     "--decode-policy", "least_load", "--api-key-env", "CORE_BENCH_KEY",
                     "--max-concurrency", "256", "--queue-size", "1024"])
    app, _health, _follower = build(ns)
    server = HttpServer(app.handle)
    waiting: list[tuple[UpstreamConn, bytes]] = []
    for w in app.workers.all():  # one pooled keep-alive connection per worker
        conn = UpstreamConn(w.pool)
        answer = http_answer(w.role, stream, fake_answers(w.role)[(b"/generate", int(stream))])
        conn.connection_made(MemoryTransport(lambda t, c=conn, a=answer: waiting.append((c, a))))
        w.pool.release(conn)
    client = HttpConnection(server)
    client_t = MemoryTransport()
    client.connection_made(client_t)
    reqs = lengthen(load_requests({"kind": "router", "key": KEY}, stream), prefix_chars)
    want = b"data: [DONE]" if stream else b'"text"'
    if policy == "kv_aware":
        warm_kv_index(app.dispatcher.policies["prefill"], app.workers.healthy["prefill"], reqs)
    gc.collect()  # the collector settings of hpcserve/router/main.py serve()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for i in range(requests):
            client.data_received(reqs[i % len(reqs)])
            while waiting:  # prefill answers first, as it usually does
                conn, answer = waiting.pop(0)
                conn.data_received(answer)
        times.append((time.process_time() - t0) / requests * 1e6)
        last = b"".join(client_t.out[-3:])
        if b"HTTP/1.1 200" not in last or want not in last:
            raise SystemExit(f"unexpected answer: {last[:300]!r}")
        client_t.out.clear()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--policies", default="cache_aware", help="comma-separated prefill policies to measure")
    ap.add_argument("--prefix-chars", type=int, default=0, help="shared system prompt length in front of each text")
    ns = ap.parse_args(argv)
    kind = "streaming" if ns.stream else "non-streaming"
    best = {}
    for policy in ns.policies.split(","):
        times = asyncio.run(run(ns.requests, ns.repeats, ns.stream, policy, ns.prefix_chars))
        best[policy] = min(times)
        print(f"router core, {kind} PD request, no sockets: best {min(times):.1f} us CPU (prefill policy {policy}, "
              f"prefix {ns.prefix_chars} chars; repeats: {', '.join(f'{t:.1f}' for t in times)})")
    if "kv_aware" in best and "cache_aware" in best:
        ratio = best["kv_aware"] / best["cache_aware"]
        print(f"kv_aware / cache_aware cost: {ratio:.2f}x (goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
