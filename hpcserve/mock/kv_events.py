"""KV events in SGLang's wire format (``--kv-events-config``), published by the mock's KV cache.

The format (SGLang's srt/disaggregation/kv_events.py, the same as vLLM's): a ZeroMQ PUB socket sends
three frames per batch -- topic, sequence number (8 bytes big-endian, from 0), msgpack payload. The
payload is ``[ts, events, attn_dp_rank]``; each event is a map tagged by ``type``: ``BlockStored``
(block_hashes, parent_block_hash, token_ids, block_size, lora_id), ``BlockRemoved`` (block_hashes) or
``AllBlocksCleared``; optional fields left unset are omitted. With a ``replay_endpoint`` a ROUTER socket
answers a request (empty frame, 8-byte start sequence) with every buffered batch from that sequence on,
as [empty, topic, seq, payload] each, then [empty, empty, seq -1, empty].

The structs below are written from that description; tests decode what the mock sends with them.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from typing import Any, Optional, Union

import msgspec

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class EventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Any]
    attn_dp_rank: Optional[int] = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: Optional[int]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str] = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: Optional[str] = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]


DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def to_wire(events: list[tuple], block_size: int) -> list[KVCacheEvent]:
    """The KV cache's event tuples (see kvcache.py) as SGLang event structs."""
    out: list[KVCacheEvent] = []
    for ev in events:
        if ev[0] == "stored":
            out.append(BlockStored(list(ev[1]), ev[2], list(ev[3]), block_size, None, "GPU"))
        elif ev[0] == "removed":
            out.append(BlockRemoved(list(ev[1]), "GPU"))
        else:
            out.append(AllBlocksCleared())
    return out


class KVEventsConfig(msgspec.Struct, forbid_unknown_fields=False):
    """The JSON of ``--kv-events-config`` (SGLang's fields; ``publisher`` "zmq" turns it on)."""

    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    bind: Optional[bool] = None  # None: bind a wildcard host, connect to a concrete one (SGLang's rule)
    replay_endpoint: Optional[str] = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    topic: str = ""


def parse_config(text: Any) -> KVEventsConfig | None:
    if not text or text is True:
        return None
    try:
        cfg = msgspec.json.decode(text if isinstance(text, str) else json.dumps(text), type=KVEventsConfig)
    except msgspec.DecodeError as err:
        raise ValueError(f"--kv-events-config is not valid: {err}") from None
    if cfg.publisher == "null":
        return None
    if cfg.publisher != "zmq":
        raise ValueError(f"--kv-events-config publisher {cfg.publisher!r} is unknown (use \"zmq\")")
    return cfg


class ZmqPublisher:
    """PUB (and optional replay ROUTER) served by one thread, fed through a queue: publishing never blocks
    the engine's event loop, and the replay buffer keeps the last ``buffer_steps`` batches."""

    def __init__(self, cfg: KVEventsConfig, block_size: int) -> None:
        import zmq  # only servers started with --kv-events-config need it

        self.block_size = block_size
        self.cfg = cfg
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(cfg.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        endpoint = cfg.endpoint
        bind = cfg.bind
        if bind is None:
            bind = any(w in endpoint for w in ("*", "0.0.0.0", "::")) or not endpoint.startswith("tcp://")
        if bind:
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self._replay = None
        if cfg.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(cfg.replay_endpoint)
        self._topic = cfg.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.buffer_steps)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._seq = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def describe(self) -> dict[str, Any]:
        """The ``kv_events`` block of /server_info, in SGLang's shape: a router dials
        tcp://<worker host>:<endpoint_port_base> (the worker URL's host replaces a wildcard)."""
        out: dict[str, Any] = {"publisher": "zmq", "endpoint_host": _host(self.cfg.endpoint),
                               "endpoint_port_base": _port(self.cfg.endpoint), "topic": self.cfg.topic,
                               "block_size": self.block_size, "dp_size": 1}
        if self.cfg.replay_endpoint:
            out["replay_endpoint_port_base"] = _port(self.cfg.replay_endpoint)
        return out

    def publish(self, events: list[tuple]) -> None:
        if self._running:
            self._queue.put(KVEventBatch(time.time(), to_wire(events, self.block_size), 0))

    def close(self) -> None:
        self._running = False
        self._queue.put(None)
        self._thread.join(timeout=2.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def _run(self) -> None:
        enc = msgspec.msgpack.Encoder()
        while True:
            if self._replay is not None:
                while self._replay.poll(0):
                    self._serve_replay()
            try:
                batch = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            if batch is None:
                return
            payload = enc.encode(batch)
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
            try:
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=self._zmq.NOBLOCK)
            except self._zmq.Again:
                pass  # past the high-water mark: subscribers see the gap and ask the replay socket

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            return
        ident, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((ident, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((ident, b"", b"", END_SEQ, b""))


def _host(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def _port(endpoint: str) -> int | None:
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def make_publisher(extras: dict[str, Any], block_size: int) -> ZmqPublisher | None:
    cfg = parse_config(extras.get("kv_events_config"))
    return None if cfg is None else ZmqPublisher(cfg, block_size)
