"""Subscriptions to the workers' KV events (SGLang's ``--kv-events-config`` wire format) feeding KVIndex.

Each worker's endpoint comes from its own /server_info (SGLang's ``kv_events`` block: endpoint host, port
base, topic, block size, replay port), fetched once when the policy first sees the worker, so nothing
has to be configured per worker. One asyncio task per worker reads its ZeroMQ SUB socket (pyzmq's asyncio
a reader thread per worker hands messages to the loop, which never blocks) and applies batches in sequence order:

- seq == expected: applied.
- seq < expected: the publisher restarted (its numbering begins at 0 again): the worker's blocks are
  dropped from the index, then the batch is applied.
- seq > expected (a gap: the PUB socket dropped batches) or a first batch later than 0: the missed
  batches are asked from the replay socket; if that fails within REPLAY_TIMEOUT the worker's blocks are
  dropped (an index that misses events would claim blocks the worker no longer holds).

While a worker is not ``live`` (no endpoint yet, resyncing) the policy scores it on load only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import msgspec
import orjson

from hpcserve.router.kv_index import KVIndex

log = logging.getLogger("hpcserve.router")

REPLAY_TIMEOUT = 2.0
INFO_TIMEOUT = 3.0
RETRY_INFO_AFTER = 10.0
END_SEQ = -1


class _Stored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class _Removed(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class _Cleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_Stored | _Removed | _Cleared]
    attn_dp_rank: int | None = None


_DECODE = msgspec.msgpack.Decoder(_Batch)


def apply_payload(index: KVIndex, wid: str, payload: bytes) -> int:
    """Apply one msgpack KVEventBatch to the index; returns the number of events (unknown ones are an error)."""
    batch = _DECODE.decode(payload)
    for ev in batch.events:
        if isinstance(ev, _Stored):
            index.stored(wid, ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size)
        elif isinstance(ev, _Removed):
            index.removed(wid, ev.block_hashes)
        else:
            index.clear(wid)
    return len(batch.events)


class Feed:
    """One worker's event stream."""

    def __init__(self, wid: str, index: KVIndex, endpoint: str, topic: str = "", replay: str | None = None,
                 block_size: int | None = None) -> None:
        self.wid, self.index = wid, index
        self.endpoint, self.topic, self.replay, self.block_size = endpoint, topic, replay, block_size
        self.expected: int | None = None
        self.state = "connecting"
        self.batches = self.gaps = self.restarts = self.resyncs = self.drops = 0
        self.last_event = 0.0
        self.task: asyncio.Task | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self._stop.set()

    def view(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "state": self.state, "batches": self.batches, "gaps": self.gaps,
                "restarts": self.restarts, "resyncs": self.resyncs, "drops": self.drops,
                "blocks": self.index.blocks(self.wid)}

    async def _run(self) -> None:
        # A thread owns the SUB socket and hands whole messages to this task through an asyncio queue:
        # pyzmq's asyncio sockets can miss wake-ups under uvloop (ZeroMQ's descriptor is edge-triggered).
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        thread = threading.Thread(target=self._reader, args=(loop, inbox), name=f"kv-feed-{self.wid}", daemon=True)
        thread.start()
        self.state = "live"
        try:
            while True:
                frames = await inbox.get()
                if frames is None:
                    raise OSError("the subscription socket failed")
                if len(frames) != 3:
                    continue
                await self.on_batch(int.from_bytes(frames[1], "big", signed=True), frames[2])
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a malformed stream must not take the router down: load only from now on
            log.warning("KV events of %s stopped: %s", self.wid, err)
            self.state = "failed"
            self.index.clear(self.wid)
        finally:
            self._stop.set()

    def _reader(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                if sock.poll(200):
                    loop.call_soon_threadsafe(inbox.put_nowait, sock.recv_multipart())
        except Exception:
            if not loop.is_closed():
                loop.call_soon_threadsafe(inbox.put_nowait, None)
        finally:
            sock.close(linger=0)

    async def on_batch(self, seq: int, payload: bytes) -> None:
        exp = self.expected
        if exp is not None and seq < exp:
            self.restarts += 1
            self.index.clear(self.wid)
        elif (exp is None and seq > 0) or (exp is not None and seq > exp):
            self.gaps += 1
            await self.resync(exp or 0, seq)
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        apply_payload(self.index, self.wid, payload)
        self.expected = seq + 1
        self.batches += 1
        self.last_event = time.monotonic()

    async def resync(self, first: int, upto: int) -> None:
        """Fetch batches [first, upto) from the replay socket, or drop the worker's blocks."""
        self.state = "resyncing"
        try:
            got = await self._replay(first, upto) if self.replay else None
        finally:
            self.state = "live"
        if got is None or (got and got[0][0] != first) or (not got and first < upto):
            self.drops += 1
            self.index.clear(self.wid)
            return
        self.resyncs += 1
        for seq, payload in got:
            self._apply(seq, payload)

    async def _replay(self, first: int, upto: int) -> list[tuple[int, bytes]] | None:
        return await asyncio.to_thread(self._replay_sync, first, upto)

    def _replay_sync(self, first: int, upto: int) -> list[tuple[int, bytes]] | None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.replay)
        out: list[tuple[int, bytes]] = []
        try:
            sock.send_multipart((b"", first.to_bytes(8, "big")))
            while True:
                if not sock.poll(int(REPLAY_TIMEOUT * 1000)):
                    return None
                frames = sock.recv_multipart()
                if len(frames) != 4:
                    return None
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    return out
                if first <= seq < upto:
                    out.append((seq, frames[3]))
        except zmq.ZMQError:
            return None
        finally:
            sock.close(linger=0)


async def fetch_kv_events_info(host: str, port: int) -> dict | None:
    """The ``kv_events`` block of a worker's /server_info (None if it publishes none or cannot be asked)."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), INFO_TIMEOUT)
        writer.write(f"GET /server_info HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), INFO_TIMEOUT)
        head, _, body = raw.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            return None
        info = orjson.loads(body).get("kv_events")
        return info if isinstance(info, dict) and info.get("endpoint_port_base") else None
    except (OSError, asyncio.TimeoutError, orjson.JSONDecodeError, AttributeError):
        return None
    finally:
        if writer is not None:
            writer.close()


def endpoints_from_info(host: str, info: dict) -> tuple[str, str | None, str]:
    """SUB and replay endpoints of a worker at ``host`` (a wildcard endpoint host means the worker's)."""
    ehost = str(info.get("endpoint_host") or host)
    if ehost in ("*", "0.0.0.0", "::", ""):
        ehost = host
    sub = f"tcp://{ehost}:{int(info['endpoint_port_base'])}"
    rport = info.get("replay_endpoint_port_base")
    replay = f"tcp://{ehost}:{int(rport)}" if rport else None
    return sub, replay, str(info.get("topic") or "")


class Feeds:
    """Every worker's feed, keyed by worker id: started on first sight, dropped when the worker leaves."""

    def __init__(self, index: KVIndex) -> None:
        self.index = index
        self.feeds: dict[str, Feed] = {}
        self._asking: dict[str, float] = {}   # worker -> when its /server_info may be asked again
        self._tasks: set[asyncio.Task] = set()

    def live(self, wid: str) -> bool:
        f = self.feeds.get(wid)
        return f is not None and f.state == "live"

    def ensure(self, w) -> None:
        """Start discovering ``w``'s event endpoint unless known or recently asked (never blocks)."""
        wid = w.id
        if wid in self.feeds or self._asking.get(wid, 0.0) > time.monotonic():
            return
        self._asking[wid] = time.monotonic() + RETRY_INFO_AFTER
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._discover(wid, w.host, w.port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discover(self, wid: str, host: str, port: int) -> None:
        info = await fetch_kv_events_info(host, port)
        if info is None or wid in self.feeds or wid not in self._asking:
            return
        sub, replay, topic = endpoints_from_info(host, info)
        self.add(wid, sub, replay, topic, info.get("block_size"))

    def add(self, wid: str, endpoint: str, replay: str | None = None, topic: str = "",
            block_size: int | None = None) -> Feed:
        feed = Feed(wid, self.index, endpoint, topic, replay, block_size)
        self.feeds[wid] = feed
        feed.start()
        return feed

    def drop(self, wid: str) -> None:
        self._asking.pop(wid, None)
        feed = self.feeds.pop(wid, None)
        if feed is not None:
            feed.close()
        self.index.clear(wid)

    def close(self) -> None:
        for wid in list(self.feeds):
            self.drop(wid)
