"""The mock engine's KV cache: exact hits, LRU eviction of unreferenced leaves, reporting through
meta_info and OpenAI usage, /flush_cache, and KV events in SGLang's wire format (decoded here with a
decoder written from SGLang's description, not the publisher's own structs)."""

from __future__ import annotations

import time

import httpx
import msgspec
import pytest
import zmq

from hpcserve.mock.kvcache import KVCache, capacity_blocks, chain_hashes
from hpcserve.engine_shell.launch import free_port
from hpcserve.mock.launch import MockProcess
from hpcserve.engine_shell.tokenizer import OFFSET, apply_chat_template, encode


def ids(n: int, salt: int = 0) -> list[int]:
    return [OFFSET + (i * 7 + salt) % 250 for i in range(n)]


def test_prefix_hit_counts_full_blocks_and_keeps_last_token_computed():
    events: list = []
    kv = KVCache(block_size=4, num_blocks=100, publish=events.append)
    a = ids(10)
    first = kv.start(a)
    assert first.cached_tokens == 0 and kv.used_blocks == 2           # 10 tokens: two full blocks
    kv.finish(first, a + ids(3, 99))                                   # 13 tokens: three full blocks
    assert kv.used_blocks == 3
    assert kv.start(a + [OFFSET + 1] * 5).cached_tokens == 8           # the two prompt blocks
    assert kv.start(a[:8]).cached_tokens == 4                          # fully cached: the last block recomputed
    assert kv.start(ids(10, 1)).cached_tokens == 0                     # another prefix
    stored = [e for batch in events for e in batch if e[0] == "stored"]
    assert stored[0] == ("stored", chain_hashes(a, 4), None, a[:8])
    h = chain_hashes(a + ids(3, 99), 4)
    assert stored[1] == ("stored", [h[2]], h[1], (a + ids(3, 99))[8:12])


def test_lru_evicts_unreferenced_leaves_first():
    events: list = []
    kv = KVCache(block_size=2, num_blocks=4, publish=events.append)
    a, b, c = ids(4, 1), ids(4, 2), ids(4, 3)
    la = kv.start(a)
    kv.finish(la, a)
    lb = kv.start(b)
    kv.finish(lb, b)
    assert kv.used_blocks == 4
    lc = kv.start(c)                                                   # evicts a's two blocks (LRU), leaf first
    ha = chain_hashes(a, 2)
    removed = [e for batch in events for e in batch if e[0] == "removed"]
    assert removed == [("removed", [ha[1], ha[0]])]
    assert kv.evicted_blocks == 2 and kv.match(a + [OFFSET]) == 0 and kv.match(b + [OFFSET]) == 4
    # blocks held by a running request are never evicted: c holds 2, b's 2 go, then nothing more fits
    d = ids(6, 4)
    ld = kv.start(d)
    assert ld.held == chain_hashes(d, 2)[:2] and kv.match(b + [OFFSET]) == 0
    assert kv.used_blocks == 4
    kv.finish(lc, c)                                                   # released, c stays cached
    kv.finish(ld, d)                                                   # d's third block evicts c's leaf
    assert kv.match(d + [OFFSET]) == 6 and kv.match(c + [OFFSET]) == 2 and kv.used_blocks == 4


def test_flush_clears_and_reports():
    events: list = []
    kv = KVCache(block_size=4, num_blocks=10, publish=events.append)
    lease = kv.start(ids(9))
    kv.finish(lease, ids(9))
    kv.flush()
    assert kv.used_blocks == 0 and kv.match(ids(9)) == 0 and events[-1] == [("cleared",)]


def test_capacity_from_memory_or_flags():
    assert capacity_blocks({"num_gpu_blocks": "300"}, 16) == 300
    assert capacity_blocks({"max_total_tokens": "4800"}, 16) == 300
    # (80 GiB x 0.5 - 16 GiB) / 128 KiB per token / 16 tokens per block
    assert capacity_blocks({"mem_fraction_static": "0.5"}, 16) == (40 - 16) * 2**30 // (128 * 1024) // 16


# SGLang's wire format, as documented in its srt/disaggregation/kv_events.py: a positional array
# [ts, events, attn_dp_rank]; events are maps tagged by "type" with optional fields omitted.
class WireBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class WireBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True):
    block_hashes: list[int]
    medium: str | None = None


class WireAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class WireBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[WireBlockStored | WireBlockRemoved | WireAllBlocksCleared]
    attn_dp_rank: int | None = None


def recv_batch(sub: zmq.Socket) -> tuple[int, WireBatch]:
    assert sub.poll(10_000), "no KV event within 10 s"
    topic, seq, payload = sub.recv_multipart()
    assert topic == b"" and len(seq) == 8
    return int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload, type=WireBatch)


@pytest.fixture
def mock_with_events(tmp_path):
    pub, replay = free_port(), free_port()
    cfg = ('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:%d", "bind": true, '
           '"replay_endpoint": "tcp://127.0.0.1:%d"}' % (pub, replay))
    mp = MockProcess.start(["--kv-events-config", cfg, "--page-size", "4", "--num-gpu-blocks", "6"],
                           log_dir=tmp_path, wait="ready")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(f"tcp://127.0.0.1:{pub}")
    time.sleep(0.3)  # a SUB socket sees only what is published after it joined (ZeroMQ's slow joiner)
    try:
        yield mp, sub, replay
    finally:
        mp.stop()
        sub.close(0)


def test_mock_reports_cached_tokens_and_publishes_sglang_events(mock_with_events):
    mp, sub, replay = mock_with_events
    c = httpx.Client(timeout=30.0)
    text = "abcdefghij"                                                  # 10 bytes = 10 tokens
    first = c.post(mp.url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 2}}).json()
    assert first["meta_info"]["cached_tokens"] == 0
    seq, batch = recv_batch(sub)
    stored = batch.events[0]
    assert seq == 0 and batch.attn_dp_rank == 0 and isinstance(stored, WireBlockStored)
    assert stored.token_ids == encode("abcdefgh") and stored.block_size == 4 and stored.parent_block_hash is None
    assert stored.block_hashes == chain_hashes(encode(text), 4)
    out = first["output_ids"]
    seq, batch = recv_batch(sub)                                         # the finished request's third block
    full = encode(text) + out
    assert seq == 1 and batch.events[0].block_hashes == chain_hashes(full, 4)[2:3]
    again = c.post(mp.url + "/generate", json={"text": text + "klmno", "sampling_params": {"max_new_tokens": 1}})
    assert again.json()["meta_info"]["cached_tokens"] == 8
    msgs = [{"role": "user", "content": "tell me"}]
    body = {"model": "mock-model", "messages": msgs, "max_tokens": 2}
    c.post(mp.url + "/v1/chat/completions", json=body)
    usage = c.post(mp.url + "/v1/chat/completions", json=body).json()["usage"]
    n = len(encode(apply_chat_template(msgs)))
    # 31 tokens: 7 full blocks, of which the 6-block capacity keeps 6 (the earlier text's blocks evicted)
    assert n == 31 and usage["prompt_tokens"] == n and usage["prompt_tokens_details"] == {"cached_tokens": 24}
    # 6 blocks of capacity: the chat prompts evicted blocks, and the removals came as events
    seen = []
    while sub.poll(500):
        seen.append(recv_batch(sub)[1])
    assert any(isinstance(e, WireBlockRemoved) for b in seen for e in b.events)
    assert c.get(mp.url + "/mock/stats").json()["kv_cache"]["used_blocks"] <= 6
    assert c.post(mp.url + "/flush_cache").status_code == 200
    _, batch = recv_batch(sub)
    assert isinstance(batch.events[0], WireAllBlocksCleared)
    assert c.post(mp.url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 1}}
                  ).json()["meta_info"]["cached_tokens"] == 0
    # the replay socket resends from a sequence number, then the end marker (seq -1)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{replay}")
    try:
        dealer.send_multipart((b"", (1).to_bytes(8, "big")))
        assert dealer.poll(10_000)
        frames = dealer.recv_multipart()
        assert frames[0] == b"" and int.from_bytes(frames[2], "big") == 1
        while int.from_bytes(frames[2], "big", signed=True) != -1:
            assert dealer.poll(10_000)
            frames = dealer.recv_multipart()
    finally:
        dealer.close(0)


def test_bench_reports_the_cached_token_ratio_only_when_the_server_does():
    from hpcserve.bench.stats import RequestResult, level_metrics

    def res(prompt, cached):
        return RequestResult(ok=True, prompt_tokens=prompt, output_tokens=2, ttft=0.01, e2e=0.02, cached_tokens=cached)

    m = level_metrics([res(10, 8), res(30, 0), res(10, None)], concurrency=1, duration_s=1.0)
    assert m.cached_token_ratio == pytest.approx(8 / 50)
    assert level_metrics([res(10, None)], concurrency=1, duration_s=1.0).cached_token_ratio is None


def test_mock_with_a_kv_cache_exports_sglangs_usage_and_hit_rate_gauges(tmp_path):
    """What the control API shows per worker (kv_usage, cached_token_ratio) comes from these two gauges."""
    from hpcserve.control.state import engine_gauges
    mp = MockProcess.start(["--page-size", "4", "--num-gpu-blocks", "6"], log_dir=tmp_path, wait="ready")
    plain = MockProcess.start([], log_dir=tmp_path, wait="ready")
    try:
        c = httpx.Client(timeout=30.0)
        assert engine_gauges(c.get(mp.url + "/metrics").text) == (0.0, 0.0)
        for text in ("abcdefghij", "abcdefghijklm"):                     # 10 then 13 tokens, 8 shared
            c.post(mp.url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 2}})
        usage, ratio = engine_gauges(c.get(mp.url + "/metrics").text)
        kv = c.get(mp.url + "/mock/stats").json()["kv_cache"]
        assert (kv["hit_tokens"], kv["query_tokens"], kv["num_blocks"]) == (8, 23, 6)
        assert (usage, ratio) == (pytest.approx(kv["used_blocks"] / 6), pytest.approx(8 / 23))
        assert 0 < usage <= 1
        assert engine_gauges(c.get(plain.url + "/metrics").text) == (None, None)   # no KV cache modelled
    finally:
        mp.stop()
        plain.stop()
