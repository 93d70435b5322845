"""Policy kv_aware: the router's KV index follows the engines' events (store, remove, clear, restart, gap),
routing follows cached overlap, and a worker that leaves drops out of the index."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec
import pytest

from hpcserve.mock.kv_events import KVEventsConfig, ZmqPublisher
from hpcserve.mock.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from hpcserve.mock.launch import MockProcess, free_port
from hpcserve.mock.tokenizer import encode
from hpcserve.router.kv_feed import Feed, apply_payload
from hpcserve.router.kv_index import KVIndex, prefix_hashes
from hpcserve.router.kv_policy import KVAware, chat_text
from hpcserve.router.policies import routing_key
from hpcserve.router.workers import WorkerSet

BS = 4
ENC = msgspec.msgpack.Encoder()


def payload(*events) -> bytes:
    return ENC.encode(KVEventBatch(time.time(), list(events), 0))


def stored(hashes, parent, text: str) -> BlockStored:
    return BlockStored(list(hashes), parent, encode(text), BS, None)


def own(text: str) -> list[int]:
    return prefix_hashes(text.encode(), BS)


def test_index_follows_store_remove_and_clear():
    idx = KVIndex()
    apply_payload(idx, "a", payload(stored([11, 12], None, "abcdefgh")))
    apply_payload(idx, "a", payload(stored([13], 12, "ijkl")))          # a child of engine block 12
    apply_payload(idx, "b", payload(stored([21], None, "abcd")))
    assert idx.match(own("abcdefghijklm"), {"a", "b"}) == {"a": 3, "b": 1}
    assert idx.match(own("abcdefghijklm"), {"b"}) == {"b": 1}
    apply_payload(idx, "a", payload(BlockRemoved([13])))
    assert idx.match(own("abcdefghijklm"), {"a", "b"}) == {"a": 2, "b": 1}
    apply_payload(idx, "a", payload(stored([99], 77, "zzzz")))          # parent never seen: not indexable
    assert idx.orphans == 1 and idx.blocks("a") == 2
    apply_payload(idx, "a", payload(AllBlocksCleared()))
    assert idx.match(own("abcdefgh"), {"a", "b"}) == {"b": 1} and idx.blocks("a") == 0
    idx.clear("b")
    assert idx.owners == {}


def test_feed_restart_and_gap_without_replay_drop_the_workers_blocks():
    async def main():
        idx = KVIndex()
        feed = Feed("a", idx, "tcp://127.0.0.1:1")                       # not started: batches fed by hand
        await feed.on_batch(0, payload(stored([1], None, "abcd")))
        await feed.on_batch(1, payload(stored([2], 1, "efgh")))
        assert idx.blocks("a") == 2
        await feed.on_batch(0, payload(stored([5], None, "wxyz")))       # numbering restarted: a new process
        assert feed.restarts == 1 and idx.match(own("abcdefgh"), {"a"}) == {} and idx.blocks("a") == 1
        await feed.on_batch(3, payload(stored([6], None, "abcd")))       # 1 and 2 lost, no replay socket
        assert feed.gaps == 1 and feed.drops == 1 and feed.expected == 4
        assert idx.blocks("a") == 1 and idx.match(own("wxyz0"), {"a"}) == {}
    asyncio.run(main())


def test_feed_gap_is_filled_from_the_replay_socket():
    async def main():
        pub, replay = free_port(), free_port()
        cfg = KVEventsConfig(publisher="zmq", endpoint=f"tcp://127.0.0.1:{pub}", bind=True,
                             replay_endpoint=f"tcp://127.0.0.1:{replay}")
        publisher = ZmqPublisher(cfg, BS)
        try:
            publisher.publish([("stored", [1], None, encode("abcd"))])
            publisher.publish([("stored", [2], 1, encode("efgh"))])
            publisher.publish([("removed", [1, 2])])
            publisher.publish([("stored", [3], None, encode("ijkl"))])
            await asyncio.sleep(0.2)
            idx = KVIndex()
            feed = Feed("a", idx, f"tcp://127.0.0.1:{pub}", replay=f"tcp://127.0.0.1:{replay}")
            await feed.on_batch(0, payload(stored([1], None, "abcd")))
            await feed.on_batch(3, payload(stored([3], None, "ijkl")))   # 1 and 2 fetched from the replay
            assert (feed.gaps, feed.resyncs, feed.drops, feed.expected) == (1, 1, 0, 4)
            assert idx.match(own("abcdefgh"), {"a"}) == {} and idx.match(own("ijkl0"), {"a"}) == {"a": 1}
        finally:
            publisher.close()
    asyncio.run(main())


def test_chat_key_renders_the_mock_template():
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert chat_text(routing_key(body)) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


@pytest.fixture
def two_mocks(tmp_path):
    started = []

    def start() -> MockProcess:
        pub = free_port()
        cfg = '{"publisher": "zmq", "endpoint": "tcp://*:%d", "replay_endpoint": "tcp://*:%d"}' % (pub, free_port())
        mp = MockProcess.start(["--kv-events-config", cfg, "--page-size", str(BS)], log_dir=tmp_path, wait="ready")
        started.append(mp)
        return mp

    yield start
    for mp in started:
        mp.stop()


async def _until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        await asyncio.sleep(0.02)


def test_routing_follows_overlap_and_a_removed_worker_leaves_the_index(two_mocks):
    a, b = two_mocks(), two_mocks()

    async def main():
        ws = WorkerSet("agg")
        wa, wb = ws.add_static("both", a.url), ws.add_static("both", b.url)
        policy = KVAware()
        ws.on_removed.append(policy.forget)                              # what the router's main wires
        workers = [wa, wb]
        policy.pick(workers, "warm up")                                  # first sight: /server_info asked
        await _until(lambda: all(policy.feeds.live(w.id) for w in workers), "both feeds live")
        await asyncio.sleep(0.3)                                         # ZeroMQ subscriptions settle
        prompt = "the quick brown fox jumps over the lazy dog " * 4
        async with httpx.AsyncClient(timeout=30.0) as http:
            first = policy.pick(workers, prompt)
            assert policy.block_size == BS                               # from the workers' /server_info
            r = await http.post(first.url + "/generate", json={"text": prompt,
                                                               "sampling_params": {"max_new_tokens": 2}})
            assert r.json()["meta_info"]["cached_tokens"] == 0
            await _until(lambda: policy.index.blocks(first.id) >= len(prompt) // BS, "the stored blocks")
            longer = prompt + "and again"
            for _ in range(3):                                           # load alone would alternate
                assert policy.pick(workers, longer) is first
            r = await http.post(first.url + "/generate", json={"text": longer,
                                                               "sampling_params": {"max_new_tokens": 1}})
            assert r.json()["meta_info"]["cached_tokens"] == (len(prompt) // BS) * BS
            # /flush_cache publishes AllBlocksCleared: the index forgets the worker's blocks
            await http.post(first.url + "/flush_cache")
            await _until(lambda: policy.index.blocks(first.id) == 0, "the clear")
            r = await http.post(first.url + "/generate", json={"text": prompt,
                                                               "sampling_params": {"max_new_tokens": 1}})
            await _until(lambda: policy.index.blocks(first.id) > 0, "the stored blocks again")
        # the worker is killed mid-run and the registry removes it: its blocks leave the index
        (a if first is wa else b).proc.kill()
        ws.remove(first.id)
        assert policy.index.blocks(first.id) == 0 and first.id not in policy.feeds.feeds
        other = wb if first is wa else wa
        bit = policy.index.bits[first.id]
        assert all(not mask & bit for mask in policy.index.owners.values())
        assert policy.pick([other], prompt) is other
        policy.feeds.close()
    asyncio.run(main())


def test_a_model_tokenizer_names_blocks_by_its_token_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "you", "are", "a", "helpful", "bot", "hi", "there"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    policy = KVAware(kv_tokenizer=str(path), kv_block_size=2)
    ids = [1, 2, 3, 4, 5, 6, 7]
    assert policy.pack("you are a helpful bot hi there") == policy.codec.pack(ids)
    # a worker stored the first two blocks (4 tokens) of the same ids: the prompt matches 2 blocks
    policy.index.stored("w", [101, 102], None, ids[:4], 2)
    data = policy.pack("you are a helpful bot hi there")
    assert policy.index.match(policy.hashes(data[:(7 - 1) // 2 * 2 * 4], 2), {"w"}) == {"w": 2}


def test_router_process_with_kv_aware_sends_a_repeated_prefix_to_its_cache(two_mocks, tmp_path):
    import subprocess
    import sys

    from hpcserve.mock.launch import http_status

    a, b = two_mocks(), two_mocks()
    port = free_port()
    log = (tmp_path / "router.log").open("wb")
    router = subprocess.Popen([sys.executable, "-m", "hpcserve.router", "--port", str(port), "--mode", "aggregated",
                               "--policy", "kv_aware", "--worker", a.url, "--worker", b.url, "--log-level", "warning"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while http_status(url + "/ready") != 200:
            assert router.poll() is None and time.monotonic() < deadline, "router not ready within 30 s"
            time.sleep(0.05)
        prompt = "a long shared system prompt for every user of this service. " * 6
        with httpx.Client(timeout=30.0) as http:
            http.post(url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 1}})
            deadline = time.monotonic() + 10
            while not all(f["state"] == "live" for f in
                          http.get(url + "/workers").json()["policies"]["both"]["feeds"].values()) or \
                    len(http.get(url + "/workers").json()["policies"]["both"]["feeds"]) < 2:
                assert time.monotonic() < deadline, "feeds not live within 10 s"
                time.sleep(0.05)
            time.sleep(0.3)
            cached = []
            for i in range(4):
                r = http.post(url + "/generate", json={"text": prompt + f"question {i}",
                                                      "sampling_params": {"max_new_tokens": 2}})
                cached.append(r.json()["meta_info"]["cached_tokens"])
                time.sleep(0.2)  # the events of this request reach the router before the next one
        full = ((len(prompt) + len("question ")) // BS) * BS  # the shared bytes, in whole blocks
        assert cached[0] == 0 and cached[1:] == [full] * 3, cached   # round robin would miss every other one
    finally:
        router.terminate()
        router.wait(10)
        log.close()
