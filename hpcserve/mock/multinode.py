"""Multi-node replicas (--nnodes K): node rank 0 leads, ranks > 0 join it over --dist-init-addr.

Like SGLang's torch.distributed rendezvous, the leader listens on the dist-init port; every other rank
connects (retrying until the leader is up, bounded by --mock-join-timeout), sends its argv and then just
stays connected. The leader reports healthy only once all K ranks joined, lists every rank's argv in
/server_info, and turns unhealthy if a rank drops. A follower exits non-zero when the leader goes away.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time

import orjson

from hpcserve.http.listen import StartupError
from hpcserve.mock.cli import MockConfig, dist_host_port


def _hello(cfg: MockConfig) -> dict:
    return {"node_rank": cfg.node_rank, "nnodes": cfg.nnodes, "dist_init_addr": cfg.dist_init_addr,
            "argv": cfg.argv, "hostname": socket.gethostname(), "pid": os.getpid(), "joined_at": time.time()}


class Ranks:
    """The leader's view of the ranks of its replica (a single-node replica is always complete)."""

    def __init__(self, cfg: MockConfig) -> None:
        self.cfg = cfg
        self.joined: dict[int, dict] = {cfg.node_rank: _hello(cfg)}
        self.lost: list[int] = []
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def missing_reason(self) -> str | None:
        if self.lost:
            return f"node rank {self.lost[0]} left the replica"
        missing = [r for r in range(self.cfg.nnodes) if r not in self.joined]
        if missing:
            return f"waiting for node ranks {missing} to join at {self.cfg.dist_init_addr}"
        return None

    def describe(self) -> list[dict]:
        return [self.joined[r] for r in sorted(self.joined)]

    async def start_leader(self) -> None:
        host, port = dist_host_port(self.cfg.dist_init_addr)
        try:
            self._server = await asyncio.start_server(self._on_rank, host, port, reuse_address=True)
        except OSError:
            try:  # the dist-init host may name another interface of this node
                self._server = await asyncio.start_server(self._on_rank, self.cfg.host, port, reuse_address=True)
            except OSError as err:
                raise StartupError(f"cannot listen on the --dist-init-addr port {port}: "
                                   f"{err.strerror or err} (choose another port)") from None

    async def _on_rank(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rank = None
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            hello = orjson.loads(line)
            rank = hello.get("node_rank")
            problem = self._check(hello)
            if problem:
                writer.write(orjson.dumps({"error": problem}) + b"\n")
                await writer.drain()
                rank = None
                return
            self.joined[rank] = hello
            if rank in self.lost:
                self.lost.remove(rank)
            self._writers.add(writer)
            writer.write(b'{"ok":true}\n')
            await writer.drain()
            print(f"mock engine: node rank {rank} joined ({len(self.joined)}/{self.cfg.nnodes})",
                  file=sys.stderr, flush=True)
            await reader.read()  # returns at EOF: the rank went away
            self.joined.pop(rank, None)
            self.lost.append(rank)
            print(f"mock engine: node rank {rank} left the replica", file=sys.stderr, flush=True)
        except (asyncio.TimeoutError, ValueError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _check(self, hello: dict) -> str | None:
        rank = hello.get("node_rank")
        if not isinstance(rank, int) or not 0 < rank < self.cfg.nnodes:
            return f"node rank {rank!r} is outside 1..{self.cfg.nnodes - 1} of this replica"
        if hello.get("nnodes") != self.cfg.nnodes:
            return f"--nnodes {hello.get('nnodes')} differs from the leader's {self.cfg.nnodes}"
        if rank in self.joined:
            return f"node rank {rank} already joined"
        return None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()


async def run_follower(cfg: MockConfig, stop: asyncio.Event) -> int:
    """A rank > 0: join the leader, then live until it goes away (exit 1) or we are told to stop (exit 0)."""
    host, port = dist_host_port(cfg.dist_init_addr)
    deadline = time.monotonic() + cfg.join_timeout
    last = "not tried"
    while True:
        if stop.is_set():
            return 0
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
            writer.write(orjson.dumps(_hello(cfg)) + b"\n")
            await writer.drain()
            reply = orjson.loads(await asyncio.wait_for(reader.readline(), 10.0) or b"{}")
            break
        except (OSError, asyncio.TimeoutError, ValueError) as err:
            last = str(err) or type(err).__name__
        if time.monotonic() >= deadline:
            print(f"mock engine: node rank {cfg.node_rank} could not join the leader at {cfg.dist_init_addr} "
                  f"within {cfg.join_timeout:g} s ({last})", file=sys.stderr, flush=True)
            return 1
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass
    if not reply.get("ok"):
        writer.close()
        print(f"mock engine: the leader at {cfg.dist_init_addr} refused node rank {cfg.node_rank}: "
              f"{reply.get('error', 'no reply')}", file=sys.stderr, flush=True)
        return 1
    print(f"mock engine: node rank {cfg.node_rank} joined the leader at {cfg.dist_init_addr}",
          file=sys.stderr, flush=True)
    eof = asyncio.ensure_future(reader.read())
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
    eof.cancel()
    stopped.cancel()
    writer.close()
    if stopped in done:
        return 0
    print(f"mock engine: the leader at {cfg.dist_init_addr} went away; node rank {cfg.node_rank} exits",
          file=sys.stderr, flush=True)
    return 1
