"""Router benchmark: the same PD load against the workers directly, our router and sglang-router, in one run.

    python bench/router.py [--requests 3000] [--concurrency 16] [--rounds 3] [--workers fake|mock]

Workers: ``fake`` (default) is a purpose-built instant worker below (canned answers, a few microseconds per
request) so the routers' own cost is what gets measured; ``mock`` uses hpcserve.mock with --mock-time-scale 0.
"direct" is the load generator doing the PD dual dispatch itself (both POSTs, wait for both), the floor any
router adds to. Our router runs with every feature on: API key, concurrency limit + queue, metrics, active
health probes, cache_aware prefill / least_load decode policies, request ids.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


API_KEY = "bench-secret-key"
TOKENS = ["Hello", " from", " the", " instant", " fake", " worker", ".", "!"]


# ---------------------------------------------------------------- instant fake worker
def _fake_answers(role: str) -> dict:
    """Pre-encoded bodies per (path, stream): the fake does no work per request beyond a JSON parse."""
    text = "".join(TOKENS)
    gen = {"text": text, "output_ids": list(range(len(TOKENS))),
           "meta_info": {"id": "x", "finish_reason": {"type": "length", "length": len(TOKENS)},
                         "prompt_tokens": 8, "completion_tokens": len(TOKENS), "cached_tokens": 0}}
    cmpl = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 8, "completion_tokens": len(TOKENS), "total_tokens": 8 + len(TOKENS)}}
    chat = {"id": "chat-x", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": cmpl["usage"]}

    def sse(events: list) -> bytes:
        return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    acc = ""
    gen_events, cmpl_events, chat_events = [], [], []
    for tok in TOKENS:
        acc += tok
        gen_events.append({"text": acc, "meta_info": gen["meta_info"]})
        cmpl_events.append({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "fake",
                            "choices": [{"index": 0, "text": tok, "finish_reason": None, "logprobs": None}]})
        chat_events.append({"id": "chat-x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                            "choices": [{"index": 0, "delta": {"content": tok}, "finish_reason": None}]})
    if role == "prefill":  # what a prefill server returns is not shown to users; keep it small
        small = orjson.dumps({"text": "", "meta_info": {"id": "p"}})
        return {(p, s): small for p in (b"/generate", b"/v1/completions", b"/v1/chat/completions") for s in (0, 1)}
    return {(b"/generate", 0): orjson.dumps(gen), (b"/generate", 1): sse(gen_events),
            (b"/v1/completions", 0): orjson.dumps(cmpl), (b"/v1/completions", 1): sse(cmpl_events),
            (b"/v1/chat/completions", 0): orjson.dumps(chat), (b"/v1/chat/completions", 1): sse(chat_events)}


class _FakeWorker(asyncio.Protocol):
    """Canned answers with the least work per request: the request is framed by Content-Length only and
    never parsed as JSON (a bytes search tells stream from not, and checks the PD bootstrap fields)."""

    def __init__(self, role: str, answers: dict, counts: dict) -> None:
        self.role, self.answers, self.counts, self.buf = role, answers, counts, b""

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            n = int(head[at + 15:].split(b"\r\n", 1)[0]) if at > 0 else 0
            if len(buf) < end + 4 + n:
                break
            body, buf = buf[end + 4:end + 4 + n], buf[end + 4 + n:]
            sp = head.find(b" ")
            out.append(self._answer(head[:sp], head[sp + 1:head.find(b" ", sp + 1)], body))
        self.buf = buf
        if out:
            self.t.write(b"".join(out))

    def _answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"get":
            data = orjson.dumps(self.counts) if path == b"/fake/stats" else b"{}"
            return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(data), data)
        self.counts["requests"] += 1
        if self.role != "both" and b'"bootstrap_room"' not in body:  # a PD router must add it
            self.counts["missing_bootstrap"] += 1
            return b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}"
        stream = 1 if b'"stream":true' in body or b'"stream": true' in body else 0
        data = self.answers.get((path, stream))
        if data is None:
            return b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}"
        if stream and self.role != "prefill":
            return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(data), data)


def serve_fake(role: str, port: int) -> None:
    answers = _fake_answers(role)
    counts = {"requests": 0, "missing_bootstrap": 0}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _FakeWorker(role, answers, counts), "127.0.0.1", port, backlog=1024)
        await asyncio.Event().wait()

    import uvloop
    uvloop.run(main())


# ---------------------------------------------------------------- load generator
def _bodies(stream: bool, pd_fields: dict | None, count: int = 256) -> list[bytes]:
    """Pre-encoded request bodies: a shared system prompt with varying tails, like chat traffic (so
    cache_aware has real work), each with its own bootstrap room when the client dispatches PD itself."""
    out = []
    for i in range(count):
        body = {"text": f"You are a helpful assistant. Question {i}: what is {i * 7919} squared?",
                "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "stream": stream}
        if pd_fields:
            body.update(pd_fields, bootstrap_room=random.getrandbits(63))
        out.append(orjson.dumps(body))
    return out


class _Exchange(asyncio.Protocol):
    """One keep-alive client connection that completes whole responses (Content-Length or chunked)."""

    def __init__(self, on_done) -> None:
        self.on_done, self.buf, self.need = on_done, b"", -1

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.buf, self.need = b"", -1
        self.t.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf = self.buf + data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            self.need = end + 4 + int(head[at + 15:].split(b"\r\n", 1)[0]) if at > 0 else 0
        if (self.need and len(buf) >= self.need) or (not self.need and buf.endswith(b"\r\n0\r\n\r\n")):
            self.on_done(self, buf)

    def connection_lost(self, exc) -> None:
        self.on_done(self, None)


async def _run_load(target: dict, n: int, conc: int, stream: bool) -> tuple[float, list[float], int]:
    """Closed loop: ``conc`` clients each send their next request as soon as the last completed.
    Returns (req/s, latencies in seconds, errors)."""
    loop = asyncio.get_running_loop()
    direct = target["kind"] == "direct"
    auth = b"authorization: Bearer %b\r\n" % target["key"].encode() if target.get("key") else b""
    pd = {"bootstrap_host": "127.0.0.1", "bootstrap_port": target.get("bootstrap_port")} if direct else None
    reqs = [b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%bcontent-length: %d\r\n\r\n%b"
            % (auth, len(b), b) for b in _bodies(stream, pd)]
    lat: list[float] = []
    state = {"sent": 0, "errors": 0, "left": n}
    finished = loop.create_future()
    perf = time.perf_counter

    def check(resp: bytes | None) -> bool:
        return bool(resp) and resp.startswith(b"HTTP/1.1 200") and (not stream or b"data: [DONE]" in resp)

    class Client:
        def __init__(self) -> None:
            self.pending = 0
            self.ok = True

        def fire(self) -> None:
            if state["sent"] >= n:
                return
            i = state["sent"]
            state["sent"] += 1
            self.t0 = perf()
            data = reqs[i % len(reqs)]
            self.ok = True
            self.pending = len(self.conns)
            for c in self.conns:
                c.send(data)

        def done(self, conn, resp) -> None:
            if self.pending <= 0:
                return
            last = conn is self.conns[-1]
            self.ok = self.ok and (check(resp) if last else bool(resp) and resp.startswith(b"HTTP/1.1 200"))
            self.pending -= 1
            if self.pending == 0:
                lat.append(perf() - self.t0)
                if not self.ok:
                    state["errors"] += 1
                state["left"] -= 1
                if state["left"] == 0 and not finished.done():
                    finished.set_result(None)
                self.fire()

    clients = []
    for _ in range(conc):
        cl = Client()
        ports = [target["prefill_port"], target["decode_port"]] if direct else [target["port"]]
        cl.conns = [(await loop.create_connection(lambda: _Exchange(cl.done), "127.0.0.1", p))[1] for p in ports]
        clients.append(cl)
    t0 = perf()
    for cl in clients:
        cl.fire()
    await asyncio.wait_for(finished, 300)
    wall = perf() - t0
    for cl in clients:
        for c in cl.conns:
            c.t.close()
    return n / wall, lat, state["errors"]


# ---------------------------------------------------------------- orchestration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, path: str = "/health", timeout: float = 60.0, want: int = 200) -> None:
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == want:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 200 on 127.0.0.1:{port}{path} within {timeout:g} s")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        f = open(log, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                             start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def start_workers(procs: Procs, kind: str, logdir: Path) -> dict:
    pp, dp, bp = _free_port(), _free_port(), _free_port()
    py = sys.executable
    if kind == "fake":
        procs.start([py, __file__, "--serve-fake", "prefill", str(pp)], str(logdir / "prefill.log"))
        procs.start([py, __file__, "--serve-fake", "decode", str(dp)], str(logdir / "decode.log"))
    else:
        common = ["--model-path", "bench-model", "--host", "127.0.0.1", "--mock-time-scale", "0"]
        procs.start([py, "-m", "hpcserve.mock", *common, "--port", str(pp), "--disaggregation-mode", "prefill",
                     "--disaggregation-bootstrap-port", str(bp)], str(logdir / "prefill.log"))
        procs.start([py, "-m", "hpcserve.mock", *common, "--port", str(dp), "--disaggregation-mode", "decode"],
                    str(logdir / "decode.log"))
    _wait_http(pp)
    _wait_http(dp)
    return {"prefill_port": pp, "decode_port": dp, "bootstrap_port": bp}


def start_ours(procs: Procs, w: dict, logdir: Path, processes: int = 1) -> dict:
    port = _free_port()
    procs.start([sys.executable, "-m", "hpcserve.router", "--port", str(port), "--mode", "pd",
                 "--processes", str(processes),
                 "--prefill", f"http://127.0.0.1:{w['prefill_port']}", str(w["bootstrap_port"]),
                 "--decode", f"http://127.0.0.1:{w['decode_port']}", "--prefill-policy", "cache_aware",
                 "--decode-policy", "least_load", "--api-key-env", "BENCH_ROUTER_KEY", "--max-concurrency", "256",
                 "--queue-size", "1024", "--health-interval", "1", "--log-level", "warning"],
                str(logdir / f"ours-{processes}.log"), env={"BENCH_ROUTER_KEY": API_KEY})
    _wait_http(port, "/ready")
    return {"kind": "router", "port": port, "key": API_KEY, "pid": procs.procs[-1].pid}


def start_sglang(procs: Procs, w: dict, logdir: Path) -> dict | None:
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        print("sglang-router is not installed (pip install sglang-router): skipping it")
        return None
    port = _free_port()
    procs.start([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                 "--pd-disaggregation", "--prefill", f"http://127.0.0.1:{w['prefill_port']}", str(w["bootstrap_port"]),
                 "--decode", f"http://127.0.0.1:{w['decode_port']}", "--prefill-policy", "cache_aware",
                 "--decode-policy", "round_robin", "--prometheus-port", str(_free_port()),
                 "--prometheus-host", "127.0.0.1", "--log-level", "warn"], str(logdir / "sglang-router.log"))
    _wait_http(port, "/health", timeout=120)
    return {"kind": "router", "port": port, "pid": procs.procs[-1].pid}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all threads) and its live children, from /proc."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; req/s is the median round")
    ap.add_argument("--workers", choices=["fake", "mock"], default="fake")
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--router-processes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                    help="our router with these --processes values (default 1,2)")
    ap.add_argument("--serve-fake", nargs=2, metavar=("ROLE", "PORT"), help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.serve_fake:
        serve_fake(ns.serve_fake[0], int(ns.serve_fake[1]))
        return 0
    import tempfile
    logdir = Path(tempfile.mkdtemp(prefix="bench-router-"))
    procs = Procs()
    try:
        w = start_workers(procs, ns.workers, logdir)
        targets = {"direct": {"kind": "direct", **w}}
        for n in ns.router_processes:
            targets["hpcserve" if n == 1 else f"hpcserve-{n}p"] = start_ours(procs, w, logdir, n)
        sg = None if ns.skip_sglang else start_sglang(procs, w, logdir)
        if sg:
            targets["sglang-router"] = sg
        results = asyncio.run(_measure(targets, ns))
    finally:
        procs.stop()
    _report(results, ns, targets)
    shutil.rmtree(logdir, ignore_errors=True)
    return 0


async def _measure(targets: dict, ns) -> dict:
    results: dict = {}
    for stream in (False, True):
        for name, t in targets.items():  # warm-up: connections, caches, JIT-free but allocator-warm
            await _run_load(t, min(500, ns.requests), ns.concurrency, stream)
        for _ in range(ns.rounds):
            for name, t in targets.items():
                cpu0 = cpu_seconds(t["pid"]) if "pid" in t else 0.0
                rps, lat, err = await _run_load(t, ns.requests, ns.concurrency, stream)
                r = results.setdefault((stream, name), {"rps": [], "lat": [], "errors": 0, "cpu": 0.0})
                r["cpu"] += (cpu_seconds(t["pid"]) - cpu0) if "pid" in t else 0.0
                r["rps"].append(rps)
                r["lat"].extend(lat)
                r["errors"] += err
    return results


def _report(results: dict, ns, targets: dict) -> None:
    print(f"\nPD mode, {ns.workers} workers, concurrency {ns.concurrency}, {ns.requests} requests x {ns.rounds} "
          f"rounds per target, {os.cpu_count()} CPUs shared by load generator, workers and router")
    for stream in (False, True):
        print(f"\n{'streaming' if stream else 'non-streaming'}:")
        print(f"  {'target':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'errors':>8}"
              f"{'router CPU us/req':>19}")
        base = results[(stream, "direct")]
        b50, b99 = pct(base["lat"], 0.5), pct(base["lat"], 0.99)
        for name in targets:
            r = results[(stream, name)]
            rps = statistics.median(r["rps"])
            p50, p99 = pct(r["lat"], 0.5), pct(r["lat"], 0.99)
            r["median_rps"] = rps
            cpu = f"{r['cpu'] / len(r['lat']) * 1e6:.0f}" if name != "direct" else "-"
            print(f"  {name:<14}{rps:>9.0f}{p50 * 1e3:>9.3f}{p99 * 1e3:>9.3f}{(p50 - b50) * 1e3:>9.3f}"
                  f"{(p99 - b99) * 1e3:>9.3f}{r['errors']:>8}{cpu:>19}")
        for name in [n for n in targets if n.startswith("hpcserve")]:
            ours = results[(stream, name)]
            if (stream, "sglang-router") in results:
                ratio = ours["median_rps"] / results[(stream, "sglang-router")]["median_rps"]
                print(f"  {name} / sglang-router req/s: {ratio:.2f}x (goal >= 2.0x)")
            print(f"  {name} / direct req/s: {ours['median_rps'] / base['median_rps']:.2f}x; added p50 "
                  f"{(pct(ours['lat'], 0.5) - b50) * 1e3:.3f} ms (goal <= 0.5 ms)")


if __name__ == "__main__":
    sys.exit(main())
