"""Where a prompt goes matters more than the router's microseconds: cached tokens per routing policy.

One run. Per workload (kv_workloads.py), four mock workers shared by every router (KV cache model on,
--page-size 16, KV events on, a capacity in blocks such that the four caches together hold 0.9 of that
workload's working set); each router is started in turn, given one warm-up request (kv_aware: until its
event feeds are all live, as in a router long in service), the caches are flushed, and the workload runs:

- multiturn: chat sessions that resend their whole history every turn, a long system prompt shared by all;
- sysprompts: many users sharing a few long system prompts, each with a question of their own;
- mooncake: a Mooncake-style trace, each request a list of hash ids (one id = one 64-token chunk, shared
  ids mean shared prefixes, drawn from a skewed distribution) plus a unique tail.

Routers: ours with round_robin, least_load, cache_aware and kv_aware, and sglang-router's cache_aware.
With --dynamo (needs ai-dynamo installed): Dynamo's frontend in KV mode over four dynamo.mocker workers of
the same block size and capacity (a local byte-level tokenizer, one token per byte like the mock's), started
afresh for each workload, on the same prompts through /v1/completions; its own timing model (in real time,
--speedup-ratio 1; times are multiplied by the ratio when set), so compare its cached-token ratio first
(its TTFT is printed beside ours but comes from the mocker's timing).
For each: cached-token ratio (cached / prompt tokens, from the engines' meta_info), prefill tokens
computed, TTFT p50/p90 (first streamed chunk), output tokens per second. Goals printed at the end:
kv_aware's TTFT p50 at least 2x better than round_robin's on multiturn, kv_aware's cached-token ratio at
least Dynamo's on every workload.

The modelled GPU (the mock workers' timing): Llama-3.1-8B in bf16 on one H100 SXM (TIMING below). Prefill
0.04 ms per uncached prompt token (25k tokens/s, about 40% of the H100's dense bf16 peak for 16 GFLOP per
token) plus 5 ms per prefill batch (one forward pass reads the 16 GB of weights once at 3.35 TB/s; the
mock runs a prefill batch as its own pass, as SGLang does); a decode step 7 ms
plus 0.15 ms per running sequence (the weights, plus about 0.5 GB of KV read per 4k-token sequence). Chat
prompts are as long as real sessions: a 1500-token system prompt, user turns of 100 to 300 tokens and
replies of 125 to 375 (drawn per turn; equal lengths synchronise the sessions sharing a worker), so the
sixth turn resends about 4k tokens. Times are reported in model milliseconds (wall time divided by
--scale); the default scale 1 keeps the harness's own per-request cost (Python client and router on a
shared machine) small beside the modelled times.

    python perf/kv_routing.py [--scale 1] [--routers round_robin,least_load,cache_aware,kv_aware,sglang] [--dynamo]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router import Procs, _free_port, _wait_http  # noqa: E402

from kv_workloads import BLOCK, WORKLOADS, turn, working_set_blocks  # noqa: E402

WORKERS = 4
# Llama-3.1-8B bf16 on one H100 SXM, in model milliseconds (see the module docstring for the derivation)
TIMING = {"--mock-prefill-base-ms": "5", "--mock-prefill-per-token-ms": "0.04", "--mock-decode-step-ms": "7",
          "--mock-decode-step-per-seq-ms": "0.15", "--mock-max-running": "16"}


# ---- client

class Result:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.engine_ttft: list[float] = []  # the engine's own queue + prefill time (model ms), our mocks only
        self.prompt = self.cached = self.out = 0


async def one_openai(http: httpx.AsyncClient, url: str, text: str, max_new: int, res: Result) -> str:
    """The same request through an OpenAI /v1/completions stream (Dynamo's frontend)."""
    t0 = time.perf_counter()
    first, usage, out = None, None, []
    body = {"model": DYNAMO_MODEL[0], "prompt": text, "max_tokens": max_new, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            msg = orjson.loads(line[5:])
            if msg.get("choices"):
                if first is None:
                    first = time.perf_counter() - t0
                out.append(msg["choices"][0].get("text") or "")
            if msg.get("usage"):
                usage = msg["usage"]
    res.ttft.append(first if first is not None else time.perf_counter() - t0)
    usage = usage or {}
    res.prompt += usage.get("prompt_tokens") or 0
    res.cached += ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    res.out += usage.get("completion_tokens") or 0
    return "".join(out)


async def one(http: httpx.AsyncClient, url: str, text: str, max_new: int, res: Result) -> str:
    if url.endswith("#openai"):
        return await one_openai(http, url[:-len("#openai")], text, max_new, res)
    t0 = time.perf_counter()
    first = None
    last = None
    body = {"text": text, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}}
    chunks = []
    async with http.stream("POST", url + "/generate", json=body) as r:
        r.raise_for_status()
        # only the first event's arrival and the last event's content matter: the client parses nothing
        # else, so that its own CPU time (shared with the workers and the router here) stays small
        async for chunk in r.aiter_raw():
            if first is None and b"data:" in chunk:
                first = time.perf_counter() - t0
            chunks.append(chunk)
    events = [e.strip() for e in b"".join(chunks).split(b"\n\n")]
    last = orjson.loads(next(e for e in reversed(events) if e.startswith(b"data:") and e != b"data: [DONE]")[5:])
    meta = last["meta_info"]
    timing = meta.get("mock_timing")
    if timing:
        res.engine_ttft.append(timing["queue_ms"] + timing["prefill_ms"])
    res.ttft.append(first)
    res.prompt += meta["prompt_tokens"]
    res.cached += meta.get("cached_tokens") or 0
    res.out += meta["completion_tokens"]
    return last["text"]


async def run_session(http, url, sess, res, sem) -> None:
    for item in sess:
        if item[0] == "chat":
            _, system, qs, replies = item
            history = system
            for q, max_new in zip(qs, replies):
                prompt = history + turn("user", q) + "<|assistant|>\n"
                async with sem:
                    reply = await one(http, url, prompt, max_new, res)
                history = prompt + reply + "\n"
        else:
            _, text, max_new = item
            async with sem:
                await one(http, url, text, max_new, res)


async def drive(url: str, sessions: list[list], concurrency: int) -> tuple[Result, float]:
    res = Result()
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(run_session(http, url, s, res, sem) for s in sessions))
        return res, time.perf_counter() - t0


# ---- processes

def start_workers(procs: Procs, logdir: Path, blocks: int, scale: float, tag: str) -> list[str]:
    urls = []
    for i in range(WORKERS):
        port, pub, rep = _free_port(), _free_port(), _free_port()
        cfg = ('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:%d", "bind": true, '
               '"replay_endpoint": "tcp://127.0.0.1:%d"}' % (pub, rep))
        procs.start([sys.executable, "-m", "hpcserve.mock", "--model-path", "mock-model", "--host", "127.0.0.1",
                     "--port", str(port), "--page-size", str(BLOCK), "--num-gpu-blocks", str(blocks),
                     "--kv-events-config", cfg, *(x for kv in TIMING.items() for x in kv),
                     "--mock-time-scale", str(scale)], str(logdir / f"worker-{tag}-{i}.log"))
        urls.append(f"http://127.0.0.1:{port}")
    for u in urls:
        _wait_http(int(u.rsplit(":", 1)[1]))
    return urls


def start_router(procs: Procs, logdir: Path, name: str, urls: list[str], kv_weight: float = 4.0,
                 kv_request_weight: float = 64.0) -> str:
    port = _free_port()
    if name == "sglang":
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *urls, "--policy", "cache_aware", "--prometheus-port", str(_free_port()),
                "--prometheus-host", "127.0.0.1", "--log-level", "warn"]
        path, timeout = "/health", 120
    else:
        argv = [sys.executable, "-m", "hpcserve.router", "--port", str(port), "--mode", "aggregated",
                "--policy", name, "--log-level", "warning", "--max-concurrency", "256",
                "--kv-overlap-weight", str(kv_weight), "--kv-request-weight", str(kv_request_weight)]
        for u in urls:
            argv += ["--worker", u]
        path, timeout = "/ready", 60
    procs.start(argv, str(logdir / f"router-{name}.log"), part="router")
    _wait_http(port, path, timeout=timeout)
    return f"http://127.0.0.1:{port}"


DYNAMO_SPEEDUP = 1  # dynamo.mocker's --speedup-ratio (4 shortened the run but moved its mooncake reuse 36% -> 46%)
DYNAMO_MODEL = [""]  # the model directory: dynamo.mocker serves the model under its path


def make_dynamo_model(d: Path) -> Path:
    """dynamo.mocker's model directory: hpcserve's byte-level one (one token per byte, like the mock), with the
    vocabulary unpadded as when the numbers in docs/kv-routing.md were measured."""
    from hpcserve.engines.dynamo_model import make_byte_model
    return make_byte_model(d, vocab_size=0)


def start_dynamo(procs: Procs, logdir: Path, blocks: int, tag: str) -> str:
    """Four dynamo.mocker workers and a KV-mode frontend, file discovery in a fresh directory."""
    model = make_dynamo_model(logdir / "dynamo-model")
    DYNAMO_MODEL[0] = str(model)
    store = logdir / f"dynamo-kv-{tag}"
    store.mkdir()
    env = {"DYN_FILE_KV": str(store), "DYN_DISCOVERY_BACKEND": "file"}
    planes = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    for i in range(WORKERS):
        procs.start([sys.executable, "-m", "dynamo.mocker", "--model-path", str(model),
                     "--block-size", str(BLOCK), "--num-gpu-blocks-override", str(blocks),
                     "--speedup-ratio", str(DYNAMO_SPEEDUP), *planes],
                    str(logdir / f"dynamo-mocker-{tag}-{i}.log"), env=env)
    port = _free_port()
    procs.start([sys.executable, "-m", "dynamo.frontend", "--router-mode", "kv", "--http-host", "127.0.0.1",
                 "--http-port", str(port), *planes], str(logdir / f"dynamo-frontend-{tag}.log"), env=env,
                part="router")
    deadline = time.time() + 120
    while time.time() < deadline:  # ready once all four workers registered the model
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2.0)
            if r.status_code == 200 and r.json().get("data"):
                time.sleep(5)  # let every mocker register (the model appears with the first one)
                return f"http://127.0.0.1:{port}#openai"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Dynamo's frontend did not list the model within 120 s (logs in {logdir})")


def stop_last(procs: Procs) -> None:
    p = procs.procs.pop()
    p.terminate()
    try:
        p.wait(10)
    except Exception:
        p.kill()
        p.wait(10)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def warm_up(url: str, name: str, timeout: float = 30.0) -> None:
    """One request through a freshly started router, and for kv_aware until every worker's event feed is
    live: a router in service has long found its workers' feeds, and without this the workload's first
    burst would be routed on load alone while kv_aware is still discovering them."""
    httpx.post(url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 1}}, timeout=30.0)
    if name != "kv_aware":
        return
    deadline = time.time() + timeout
    while True:
        feeds = httpx.get(url + "/workers", timeout=10.0).json()["policies"]["both"]["feeds"]
        if len(feeds) == WORKERS and all(f["state"] == "live" for f in feeds.values()):
            return
        if time.time() > deadline:
            raise RuntimeError(f"kv_aware's event feeds were not all live within {timeout:g} s: {feeds}")
        time.sleep(0.1)


def run_router(procs: Procs, logdir: Path, name: str, urls: list[str], wl: str, sessions: list[list],
               ns: argparse.Namespace) -> list[tuple]:
    """One router over the workers, caches flushed first; its row (none if it did not start)."""
    try:
        url = start_router(procs, logdir, name, urls, ns.kv_weight, ns.kv_request_weight)
    except Exception as err:  # sglang-router missing or failing: say so, keep the others
        print(f"router {name} did not start: {err}")
        return []
    try:
        warm_up(url, name)
        for u in urls:
            httpx.post(u + "/flush_cache", timeout=10.0)
        time.sleep(0.3)  # the clears reach kv_aware's index before the first request
        res, wall = asyncio.run(drive(url, sessions, ns.concurrency))
        res.ttft = [t / ns.scale for t in res.ttft]  # model time, as the modelled GPU sees it
        print(line(wl, name, res, wall / ns.scale), flush=True)
        eng = sorted(res.engine_ttft)
        if eng:
            print(f"           engine-side TTFT (queue from arrival + prefill batch, model ms) "
                  f"p50 {eng[len(eng) // 2]:.1f}"
                  f"  p90 {eng[int(.9 * len(eng))]:.1f}", flush=True)
        if name == "kv_aware":
            pol = httpx.get(url + "/workers", timeout=10.0).json()["policies"]["both"]
            print(f"           kv_aware picks {pol['picks']}, overlap blocks {pol['overlap_blocks']}, "
                  f"feeds " + ", ".join(f"{f['state']}/{f['blocks']}b/{f['gaps']}g"
                                        for f in pol["feeds"].values()), flush=True)
        return [(wl, name, res, wall / ns.scale)]
    finally:
        stop_last(procs)


def line(wl: str, name: str, res: Result, wall: float) -> str:
    return (f"{wl:<10} {name:<12} cached {res.cached / max(res.prompt, 1):6.1%}  prefill {res.prompt - res.cached:>8}"
            f"  TTFT p50 {pct(res.ttft, .5):7.1f} ms  p90 {pct(res.ttft, .9):7.1f} ms  out {res.out / wall:7.0f} tok/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="mock time scale (wall ms per model ms)")
    ap.add_argument("--routers", default="round_robin,least_load,cache_aware,kv_aware,sglang")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--sessions", type=int, default=24, help="multiturn: chat sessions")
    ap.add_argument("--cache-fraction", type=float, default=0.9,
                    help="the four caches together hold this fraction of the largest working set")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--kv-weight", type=float, default=4.0, help="kv_aware's --kv-overlap-weight")
    ap.add_argument("--kv-request-weight", type=float, default=64.0, help="kv_aware's --kv-request-weight")
    ap.add_argument("--dynamo", action="store_true", help="also run Dynamo's KV router over dynamo.mocker workers")
    ns = ap.parse_args(argv)
    loads = {w: WORKLOADS[w](random.Random(ns.seed), **({"sessions": ns.sessions} if w == "multiturn" else {}))
             for w in ns.workloads.split(",")}
    ws = {w: working_set_blocks(s) for w, s in loads.items()}
    # per workload, the four caches together hold cache_fraction of its working set
    caps = {w: max(8, int(n * ns.cache_fraction / WORKERS)) for w, n in ws.items()}
    print(f"working sets (blocks of {BLOCK} tokens) and blocks per worker: "
          + ", ".join(f"{w} {ws[w]} -> {caps[w]}" for w in loads), flush=True)
    procs = Procs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kv-routing-") as tmp:
        logdir = Path(tmp)
        try:
            for wl, sessions in loads.items():
                n = len(procs.procs)
                urls = start_workers(procs, logdir, caps[wl], ns.scale, wl)
                try:
                    for name in filter(None, ns.routers.split(",")):
                        rows += run_router(procs, logdir, name, urls, wl, sessions, ns)
                finally:
                    while len(procs.procs) > n:
                        stop_last(procs)
                if ns.dynamo:  # after ours, so that the two sets of workers never compete for the CPUs
                    try:
                        url = start_dynamo(procs, logdir, caps[wl], wl)
                        res, wall = asyncio.run(drive(url, sessions, ns.concurrency))
                        res.ttft = [t * DYNAMO_SPEEDUP for t in res.ttft]  # the mocker's model time
                        rows.append((wl, "dynamo", res, wall * DYNAMO_SPEEDUP))
                        print(line(wl, "dynamo", res, wall * DYNAMO_SPEEDUP), flush=True)
                    except Exception as err:
                        print(f"Dynamo on {wl} failed: {err}")
                    finally:
                        while len(procs.procs) > n:
                            stop_last(procs)
        finally:
            procs.stop()
    print()
    print("| workload | router | cached tokens | prefill tokens computed | TTFT p50 ms | TTFT p90 ms | output tok/s |")
    print("|---|---|---|---|---|---|---|")
    for wl, name, res, wall in rows:
        label = {"sglang": "sglang-router cache_aware", "dynamo": "Dynamo KV router (dynamo.mocker)"}.get(name, name)
        print(f"| {wl} | {label} | {res.cached / max(res.prompt, 1):.1%} | {res.prompt - res.cached} | "
              f"{pct(res.ttft, .5):.1f} | {pct(res.ttft, .9):.1f} | {res.out / wall:.0f} |")
    by = {(wl, name): res for wl, name, res, _ in rows}
    if ("multiturn", "kv_aware") in by and ("multiturn", "round_robin") in by:
        ratio = pct(by["multiturn", "round_robin"].ttft, .5) / pct(by["multiturn", "kv_aware"].ttft, .5)
        print(f"\ngoal: multiturn TTFT p50 round_robin / kv_aware = {ratio:.2f}x (goal >= 2x: "
              f"{'met' if ratio >= 2 else 'NOT met'})")
        rr, kv = (sorted(by["multiturn", n].engine_ttft) for n in ("round_robin", "kv_aware"))
        if rr and kv:
            print(f"      engine-side (queue from arrival + prefill batch, without the harness): "
                  f"{rr[len(rr) // 2] / kv[len(kv) // 2]:.2f}x")
    for wl in loads:
        if (wl, "dynamo") in by and (wl, "kv_aware") in by:
            ours, theirs = (by[wl, n].cached / max(by[wl, n].prompt, 1) for n in ("kv_aware", "dynamo"))
            print(f"goal: {wl} cached-token ratio kv_aware {ours:.1%} vs Dynamo {theirs:.1%} "
                  f"({'met' if ours >= theirs else 'NOT met'})")
        best = max((r.cached / max(r.prompt, 1), n) for (w, n), r in by.items() if w == wl) if by else None
        if best:
            print(f"{wl}: highest cached-token ratio {best[0]:.1%} ({best[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
