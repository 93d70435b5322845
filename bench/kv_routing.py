"""Where a prompt goes matters more than the router's microseconds: cached tokens per routing policy.

One run, the same four mock workers for every router (KV cache model on, --page-size 16, a capacity in
blocks chosen so that the four caches together hold less than each workload's working set, KV events on).
Each router is started in turn, the workers' caches are flushed before each (router, workload) pair, and
every workload is sent through it:

- multiturn: chat sessions that resend their whole history every turn, a long system prompt shared by all;
- sysprompts: many users sharing a few long system prompts, each with a question of their own;
- mooncake: a Mooncake-style trace, each request a list of hash ids (one id = one 64-token chunk, shared
  ids mean shared prefixes, drawn from a skewed distribution) plus a unique tail.

Routers: ours with round_robin, least_load, cache_aware and kv_aware, and sglang-router's cache_aware.
With --dynamo (needs ai-dynamo installed): Dynamo's frontend in KV mode over four dynamo.mocker workers of
the same block size and capacity (a local byte-level tokenizer, one token per byte like the mock's), started
afresh for each workload, on the same prompts through /v1/completions; its own timing model, so compare its
cached-token ratio first (its TTFT is printed beside ours but comes from the mocker's timing).
For each: cached-token ratio (cached / prompt tokens, from the engines' meta_info), prefill tokens
computed, TTFT p50/p90 (first streamed chunk), output tokens per second. Goals printed at the end:
kv_aware's TTFT p50 at least 2x better than round_robin's on multiturn.

    python bench/kv_routing.py [--scale 0.2] [--routers round_robin,least_load,cache_aware,kv_aware,sglang]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router import Procs, _free_port, _wait_http  # noqa: E402

from hpcserve.mock.model import WORDS  # noqa: E402

BLOCK = 16
WORKERS = 4


def words(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        w = WORDS[rng.randrange(len(WORDS))]
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def turn(role: str, text: str) -> str:
    return f"<|{role}|>\n{text}\n"


# ---- workloads: each a list of sessions; a session is a list of (prompt builder, max_new_tokens)

def multiturn(rng: random.Random, sessions: int = 24, turns: int = 6) -> list[list]:
    system = turn("system", words(random.Random(1), 600))
    out = []
    for s in range(sessions):
        qs = [words(rng, 120) for _ in range(turns)]
        out.append([("chat", system, qs, 32)])
    return out


def sysprompts(rng: random.Random, users: int = 160, prompts: int = 4) -> list[list]:
    systems = [turn("system", words(random.Random(10 + i), 3000)) for i in range(prompts)]
    return [[("text", systems[rng.randrange(prompts)] + turn("user", words(rng, 150)) + "<|assistant|>\n", 24)]
            for _ in range(users)]


def mooncake(rng: random.Random, requests: int = 160, chunk_tokens: int = 64) -> list[list]:
    """Mooncake-style: hash ids per request (shared ids = shared prefix), skewed towards few roots."""
    chunks: dict[int, str] = {}

    def chunk(h: int) -> str:
        if h not in chunks:
            chunks[h] = words(random.Random(1000 + h), chunk_tokens)
        return chunks[h]

    trace, next_id = [], 0
    roots: list[list[int]] = []
    for _ in range(requests):
        if roots and rng.random() < 0.8:  # extend or reuse an earlier request's ids (Zipf-like reuse)
            base = roots[min(int(rng.paretovariate(1.2)) - 1, len(roots) - 1)]
            ids = base[:rng.randint(max(1, len(base) // 2), len(base))]
        else:
            ids = []
        for _ in range(rng.randint(2, 12)):
            ids = ids + [next_id]
            next_id += 1
        roots.insert(0, ids)
        trace.append({"hash_ids": ids, "output_length": 16})
    return [[("text", "".join(chunk(h) for h in t["hash_ids"]) + words(rng, 40), t["output_length"])]
            for t in trace]


WORKLOADS = {"multiturn": multiturn, "sysprompts": sysprompts, "mooncake": mooncake}


def working_set_blocks(sessions: list[list]) -> int:
    """Distinct full blocks of all prompts (multiturn counted at its last turn: the longest history)."""
    seen = set()
    for sess in sessions:
        for kind, head, tail, _ in ((s[0], s[1], s[2], s[3]) if s[0] == "chat" else (s[0], s[1], None, s[2])
                                    for s in sess):
            text = head + ("".join(turn("user", q) + turn("assistant", "x" * 40) for q in tail) if tail else "")
            data = text.encode()
            for e in range(BLOCK, len(data) + 1, BLOCK):
                seen.add(hash(data[:e]))
    return len(seen)


# ---- client

class Result:
    def __init__(self) -> None:
        self.ttft: list[float] = []
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
    async with http.stream("POST", url + "/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - t0
            last = orjson.loads(line[5:])
    meta = last["meta_info"]
    res.ttft.append(first)
    res.prompt += meta["prompt_tokens"]
    res.cached += meta.get("cached_tokens") or 0
    res.out += meta["completion_tokens"]
    return last["text"]


async def run_session(http, url, sess, res, sem) -> None:
    for item in sess:
        if item[0] == "chat":
            _, system, qs, max_new = item
            history = system
            for q in qs:
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

def start_workers(procs: Procs, logdir: Path, blocks: int, scale: float) -> list[str]:
    urls = []
    for i in range(WORKERS):
        port, pub, rep = _free_port(), _free_port(), _free_port()
        cfg = ('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:%d", "bind": true, '
               '"replay_endpoint": "tcp://127.0.0.1:%d"}' % (pub, rep))
        procs.start([sys.executable, "-m", "hpcserve.mock", "--model-path", "mock-model", "--host", "127.0.0.1",
                     "--port", str(port), "--page-size", str(BLOCK), "--num-gpu-blocks", str(blocks),
                     "--kv-events-config", cfg, "--mock-prefill-base-ms", "5", "--mock-prefill-per-token-ms", "0.2",
                     "--mock-decode-step-ms", "10", "--mock-decode-step-per-seq-ms", "0.5",
                     "--mock-max-running", "16", "--mock-time-scale", str(scale)], str(logdir / f"worker{i}.log"))
        urls.append(f"http://127.0.0.1:{port}")
    for u in urls:
        _wait_http(int(u.rsplit(":", 1)[1]))
    return urls


def start_router(procs: Procs, logdir: Path, name: str, urls: list[str], kv_weight: float = 1.0) -> str:
    port = _free_port()
    if name == "sglang":
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *urls, "--policy", "cache_aware", "--prometheus-port", str(_free_port()),
                "--prometheus-host", "127.0.0.1", "--log-level", "warn"]
        path, timeout = "/health", 120
    else:
        argv = [sys.executable, "-m", "hpcserve.router", "--port", str(port), "--mode", "aggregated",
                "--policy", name, "--log-level", "warning", "--max-concurrency", "256",
                "--kv-overlap-weight", str(kv_weight)]
        for u in urls:
            argv += ["--worker", u]
        path, timeout = "/ready", 60
    procs.start(argv, str(logdir / f"router-{name}.log"), part="router")
    _wait_http(port, path, timeout=timeout)
    return f"http://127.0.0.1:{port}"


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
                     "--block-size", str(BLOCK), "--num-gpu-blocks-override", str(blocks), *planes],
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.2, help="mock time scale (wall time per model ms)")
    ap.add_argument("--routers", default="round_robin,least_load,cache_aware,kv_aware,sglang")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cache-fraction", type=float, default=0.9,
                    help="the four caches together hold this fraction of the largest working set")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--kv-weight", type=float, default=4.0, help="kv_aware's --kv-overlap-weight")
    ap.add_argument("--dynamo", action="store_true", help="also run Dynamo's KV router over dynamo.mocker workers")
    ns = ap.parse_args(argv)
    loads = {w: WORKLOADS[w](random.Random(ns.seed)) for w in ns.workloads.split(",")}
    ws = {w: working_set_blocks(s) for w, s in loads.items()}
    blocks = max(8, int(max(ws.values()) * ns.cache_fraction / WORKERS))
    print(f"working sets (blocks of {BLOCK} tokens): " + ", ".join(f"{w} {n}" for w, n in ws.items())
          + f"; each of {WORKERS} workers holds {blocks} blocks")
    procs = Procs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kv-routing-") as tmp:
        logdir = Path(tmp)
        try:
            urls = start_workers(procs, logdir, blocks, ns.scale)
            for name in filter(None, ns.routers.split(",")):
                try:
                    url = start_router(procs, logdir, name, urls, ns.kv_weight)
                except Exception as err:  # sglang-router missing or failing: say so, keep the others
                    print(f"router {name} did not start: {err}")
                    continue
                try:
                    for wl, sessions in loads.items():
                        for u in urls:
                            httpx.post(u + "/flush_cache", timeout=10.0)
                        time.sleep(0.3)  # the clears reach kv_aware's index before the first request
                        res, wall = asyncio.run(drive(url, sessions, ns.concurrency))
                        rows.append((wl, name, res, wall))
                        print(f"{wl:<10} {name:<12} cached {res.cached / max(res.prompt, 1):6.1%}  "
                              f"prefill {res.prompt - res.cached:>8}  TTFT p50 {pct(res.ttft, .5):7.1f} ms  "
                              f"p90 {pct(res.ttft, .9):7.1f} ms  out {res.out / wall:7.0f} tok/s", flush=True)
                        if name == "kv_aware":
                            pol = httpx.get(url + "/workers", timeout=10.0).json()["policies"]["both"]
                            print(f"           kv_aware picks {pol['picks']}, overlap blocks {pol['overlap_blocks']}, "
                                  f"feeds " + ", ".join(f"{f['state']}/{f['blocks']}b/{f['gaps']}g"
                                                        for f in pol["feeds"].values()), flush=True)
                finally:
                    stop_last(procs)
            if ns.dynamo:
                for wl, sessions in loads.items():
                    n = len(procs.procs)
                    try:
                        url = start_dynamo(procs, logdir, blocks, wl)
                        res, wall = asyncio.run(drive(url, sessions, ns.concurrency))
                        rows.append((wl, "dynamo", res, wall))
                        print(f"{wl:<10} {'dynamo':<12} cached {res.cached / max(res.prompt, 1):6.1%}  "
                              f"prefill {res.prompt - res.cached:>8}  TTFT p50 {pct(res.ttft, .5):7.1f} ms  "
                              f"p90 {pct(res.ttft, .9):7.1f} ms  out {res.out / wall:7.0f} tok/s", flush=True)
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
