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
from hpcserve.engine_shell.launch import free_port
from hpcserve.mock.launch import MockProcess
from hpcserve.engine_shell.tokenizer import encode
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

    from hpcserve.engine_shell.launch import http_status

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


def test_predicted_blocks_count_until_an_event_confirms_them_or_they_expire():
    idx = KVIndex()
    chain = own("abcdefgh")                                              # two blocks
    idx.predict("a", chain, expires=10.0)
    assert idx.match(chain, {"a"}) == {"a": 2} and idx.blocks("a") == 0  # predicted, not yet reported
    idx.expire(5.0)
    assert idx.match(chain, {"a"}) == {"a": 2}
    apply_payload(idx, "a", payload(stored([11], None, "abcd")))        # the engine confirms the first block
    idx.expire(10.0)
    assert idx.match(chain, {"a"}) == {"a": 1} and idx.pending["a"] == {}
    idx.predict("b", chain, expires=20.0)
    idx.clear("b")                                                       # restart: its predictions go too
    assert idx.match(chain, {"a", "b"}) == {"a": 1}
    idx.expire(30.0)
    assert idx.match(chain, {"a", "b"}) == {"a": 1} and idx.predicted_blocks == 4


class _Worker:
    def __init__(self, wid: str) -> None:
        self.id, self.inflight = wid, 0


def _live_policy(workers, **kw) -> KVAware:
    policy = KVAware(kv_block_size=BS, **kw)
    for w in workers:
        feed = Feed(w.id, policy.index, "tcp://127.0.0.1:1", block_size=BS)   # not started: no events
        feed.state = "live"
        policy.feeds.feeds[w.id] = feed
    return policy


def test_requests_arriving_together_follow_the_first_one_to_its_worker():
    workers = [_Worker("a"), _Worker("b"), _Worker("c")]
    prompt = "a system prompt every user shares, then a question " * 3
    policy = _live_policy(workers)
    first = policy.pick(workers, prompt + "one")
    # no event has arrived yet: the shared prefix is predicted on the first worker, so the next ones follow
    assert [policy.pick(workers, prompt + q) for q in ("two", "three")] == [first, first]
    # each block predicted once: the three chains share all but the last block of the longest one
    assert policy.describe()["predicted_blocks"] == (len(prompt + "three") - 1) // BS
    # without predictions all three look uncached everywhere and ties rotate over the workers
    plain = _live_policy(workers, predict_ttl=0)
    assert len({plain.pick(workers, prompt + q).id for q in ("one", "two", "three")}) == 3


def test_in_flight_requests_outweigh_a_cached_prefix_by_the_request_weight():
    a, b = _Worker("a"), _Worker("b")
    policy = _live_policy([a, b], overlap_weight=4, request_weight=64)
    prompt = "x" * (40 * BS) + "?"                                       # 41 blocks, the first 40 reusable
    data = prompt.encode()
    policy.index.stored("a", list(range(1, 41)), None, encode(prompt[:40 * BS]), BS)
    picks = []
    for _ in range(4):
        w = policy.pick([a, b], prompt)
        w.inflight += 1                                                  # what the dispatcher counts
        picks.append(w.id)
    # cost on a: 4 x 1 block to prefill + 1 uncached block per request in flight + 64 per request in flight;
    # on b: 4 x 41 = 164. With 0, 1, 2 requests in flight a costs 4, 69, 134; with 3 it costs 199.
    assert picks == ["a", "a", "a", "b"], picks
    assert policy.index.match(policy.hashes(data[:40 * BS], BS), {"a"}) == {"a": 40}


def test_match_counts_each_workers_leading_blocks_like_a_walk_down_the_chain():
    import random

    rng = random.Random(3)
    idx = KVIndex()
    texts = ["".join(rng.choice("ab") for _ in range(rng.randrange(4, 60))) for _ in range(40)]
    for i, text in enumerate(texts):                                     # prefix-closed, as engines store
        wid = "w%d" % (i % 3)
        chain = own(text)
        idx.stored(wid, [hash((wid, h)) for h in chain], None, encode(text[:len(chain) * BS]), BS)
    for text in texts + ["abab" * 9, "b" * 30, "a"]:
        chain = own(text)
        walk = {}
        for wid in ("w0", "w1", "w2", "nobody"):
            n = 0
            while n < len(chain) and idx.owners.get(chain[n], 0) & idx.bits.get(wid, 0):
                n += 1
            if n:
                walk[wid] = n
        assert idx.match(chain, {"w0", "w1", "w2", "nobody"}) == walk, text
