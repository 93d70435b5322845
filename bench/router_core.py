"""The router's own Python cost per request, without sockets: the real app, dispatcher, policies and HTTP
state machines, driven through in-memory transports. No kernel, no other process, so the number is stable
enough to compare two versions of the hot path (bench/router.py measures the whole thing over TCP).

    python bench/router_core.py [--requests 20000] [--repeats 5] [--stream]

Prints the best-of-repeats CPU microseconds per non-streaming (or streaming) PD request, with the same
router options bench/router.py uses (API key, limiter, cache_aware prefill, least_load decode).
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
from hpcserve.router.main import build  # noqa: E402

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


async def run(requests: int, repeats: int, stream: bool) -> list[float]:
    os.environ["CORE_BENCH_KEY"] = KEY
    ns = parse_args(["--mode", "pd", "--port", "0", "--prefill", "http://127.0.0.1:9", "8998",
                     "--decode", "http://127.0.0.1:10", "--prefill-policy", "cache_aware",
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
    reqs = load_requests({"kind": "router", "key": KEY}, stream)
    want = b"data: [DONE]" if stream else b'"text"'
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
    ns = ap.parse_args(argv)
    times = asyncio.run(run(ns.requests, ns.repeats, ns.stream))
    kind = "streaming" if ns.stream else "non-streaming"
    print(f"router core, {kind} PD request, no sockets: best {min(times):.1f} us CPU "
          f"(repeats: {', '.join(f'{t:.1f}' for t in times)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
