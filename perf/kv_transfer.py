"""KV transfer rate of the torch engine's PD path between two local processes, against a plain loopback copy.

    python perf/kv_transfer.py [--mb 64] [--reps 5]

A child process packs a KV cache of about --mb MB (kvwire: raw tensor bytes behind a JSON header) and serves
it from the torch engine's bootstrap server (the code a prefill server runs); this process fetches each
room with the decode side's KVFetcher and unpacks it into tensors. The baseline is the same child sending
the same bytes over a raw TCP socket on 127.0.0.1 into a preallocated buffer here. Both sides share the
machine, so the ratio is the number to compare; each figure is the best of --reps runs.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

from hpcserve.engine_shell.launch import free_port


def _cache(mb: float):
    import torch
    layers, kv_heads, head_dim = 8, 8, 128
    per_token = layers * 2 * kv_heads * head_dim * 4
    seq = max(1, int(mb * 1e6 / per_token))
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(kv_heads, seq, head_dim, generator=g), torch.randn(kv_heads, seq, head_dim, generator=g))
            for _ in range(layers)]


async def _serve(boot_port: int, raw_port: int, mb: float, reps: int) -> None:
    from hpcserve.http import HttpServer
    from hpcserve.torchengine import kvwire
    from hpcserve.torchengine.bootstrap import BinaryBootstrapServer, BinaryKVStore
    payload = kvwire.pack(_cache(mb), {"bench": True})
    store = BinaryKVStore()
    for room in range(reps):
        store.put_bytes(room, payload)        # one bytes object shared by every room
    server = HttpServer(BinaryBootstrapServer(store, 60.0).handle, max_body_bytes=1024)
    await server.start("127.0.0.1", boot_port)

    def raw_client(conn: socket.socket) -> None:
        with conn:
            conn.sendall(len(payload).to_bytes(8, "little"))
            conn.sendall(payload)

    loop = asyncio.get_running_loop()
    raw = socket.create_server(("127.0.0.1", raw_port))
    raw.setblocking(False)
    print("ready", len(payload), flush=True)
    for _ in range(reps):
        conn, _ = await loop.sock_accept(raw)
        conn.setblocking(True)
        await loop.run_in_executor(None, raw_client, conn)
    await asyncio.sleep(600)   # until the parent stops this PID


def _raw_fetch(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        t0 = time.perf_counter()
        size = int.from_bytes(s.recv(8, socket.MSG_WAITALL), "little")
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = s.recv_into(view[got:])
            if not n:
                raise RuntimeError("raw sender closed early")
            got += n
        return time.perf_counter() - t0


async def _kv_fetch(port: int, reps: int) -> list[float]:
    from hpcserve.torchengine import kvwire
    from hpcserve.torchengine.bootstrap import KVFetcher
    fetcher = KVFetcher()
    times = []
    try:
        for room in range(reps):
            t0 = time.perf_counter()
            data = await fetcher.fetch("127.0.0.1", port, room, 60.0)
            cache, _ = kvwire.unpack(data)
            times.append(time.perf_counter() - t0)
            assert cache[0][0].shape[0] == 8
    finally:
        fetcher.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64.0, help="KV cache size in MB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--serve", nargs=2, type=int, metavar=("BOOT_PORT", "RAW_PORT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        asyncio.run(_serve(a.serve[0], a.serve[1], a.mb, a.reps))
        return 0
    boot, raw = free_port(), free_port()
    child = subprocess.Popen([sys.executable, __file__, "--mb", str(a.mb), "--reps", str(a.reps),
                              "--serve", str(boot), str(raw)], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().split()
        if not line or line[0] != "ready":
            print("bench: the serving process did not start", file=sys.stderr)
            return 1
        nbytes = int(line[1])
        kv = asyncio.run(_kv_fetch(boot, a.reps))
        base = [_raw_fetch(raw) for _ in range(a.reps)]
    finally:
        child.terminate()
        child.wait(10)
    gb = nbytes / 1e9
    kv_rate, raw_rate = gb / min(kv), gb / min(base)
    print(f"payload {nbytes / 1e6:.1f} MB (8 layers, 8 KV heads, head dim 128, float32), best of {a.reps}")
    print(f"KV transfer (bootstrap HTTP + unpack to tensors): {kv_rate:.2f} GB/s  ({min(kv) * 1e3:.1f} ms)")
    print(f"plain loopback socket copy:                      {raw_rate:.2f} GB/s  ({min(base) * 1e3:.1f} ms)")
    print(f"fraction of loopback: {kv_rate / raw_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
