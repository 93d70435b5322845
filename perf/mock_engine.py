"""Throughput of the instant mock engine (time scale 0), measured in one run on this machine.

    python perf/mock_engine.py [--requests 20000] [--concurrency 16] [--max-new-tokens 16]

Prints req/s for GET /health (the HTTP floor), non-streaming and streaming POST /generate on an
aggregated mock, and PD pairs (the client posts to prefill and decode at once, as a PD router does),
plus each as a ratio of the floor. The load generator is a raw asyncio keep-alive client, so most of
the CPU goes to the server; both share the machine, so compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

import orjson

from hpcserve.engine_shell.launch import free_port
from hpcserve.mock.launch import MockProcess


async def _read_response(reader: asyncio.StreamReader) -> bool:
    """Read one response (Content-Length or chunked); True for status 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        i = lower.index(b"content-length:")
        await reader.readexactly(int(lower[i + 15:lower.index(b"\r\n", i)]))
    return head.startswith(b"HTTP/1.1 200")


async def _one_conn(port: int, make_req, n: int, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            writer.write(make_req())
            counts[0 if await _read_response(reader) else 1] += 1
    finally:
        writer.close()


def _request(method: str, path: str, body: dict | None) -> bytes:
    if body is None:
        return f"{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    data = orjson.dumps(body)
    return (f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


async def _load(port: int, make_req, total: int, conc: int) -> tuple[float, int]:
    counts = [0, 0]
    t = time.perf_counter()
    await asyncio.gather(*(_one_conn(port, make_req, total // conc, counts) for _ in range(conc)))
    return counts[0] / (time.perf_counter() - t), counts[1]


async def _pd_load(pre: int, dec: int, boot: int, body: dict, total: int, conc: int) -> tuple[float, int]:
    """Like a PD router: each request goes to the prefill and the decode at once (keep-alive to both)."""
    rooms = itertools.count(1)
    counts = [0, 0]

    async def pair_conn(n: int) -> None:
        pr, pw = await asyncio.open_connection("127.0.0.1", pre)
        dr, dw = await asyncio.open_connection("127.0.0.1", dec)
        try:
            for _ in range(n):
                full = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": next(rooms)}
                req = _request("POST", "/generate", full)
                pw.write(req)
                dw.write(req)
                ok_p, ok_d = await asyncio.gather(_read_response(pr), _read_response(dr))
                counts[0 if ok_p and ok_d else 1] += 1
        finally:
            pw.close()
            dw.close()

    t = time.perf_counter()
    await asyncio.gather(*(pair_conn(total // conc) for _ in range(conc)))
    return counts[0] / (time.perf_counter() - t), counts[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    body = {"text": "Hello world, this is a benchmark prompt.", "sampling_params": {"max_new_tokens": args.max_new_tokens}}
    agg = MockProcess.start([], wait="ready")
    boot = free_port()
    pre = MockProcess.start(["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot)],
                            wait="ready")
    dec = MockProcess.start(["--disaggregation-mode", "decode"], wait="ready")
    try:
        n, c = args.requests, args.concurrency
        health = _request("GET", "/health", None)
        gen = _request("POST", "/generate", body)
        stream = _request("POST", "/generate", {**body, "stream": True})
        rows = [("GET /health (floor)", asyncio.run(_load(agg.port, lambda: health, n, c))),
                ("POST /generate", asyncio.run(_load(agg.port, lambda: gen, n, c))),
                ("POST /generate stream", asyncio.run(_load(agg.port, lambda: stream, n // 2, c))),
                ("PD pair /generate (prefill + decode)", asyncio.run(_pd_load(pre.port, dec.port, boot, body,
                                                                             n // 4, c)))]
    finally:
        for mp in (agg, pre, dec):
            mp.stop()
    floor = rows[0][1][0]
    print(f"mock engine, time scale 0, concurrency {args.concurrency}, max_new_tokens {args.max_new_tokens}")
    for name, (rate, errors) in rows:
        print(f"  {name:40s} {rate:9.0f} req/s   {rate / floor:5.2f} x floor   errors {errors}")


if __name__ == "__main__":
    main()
