"""Policies show the distribution they promise; the prefix tree stays bounded; request helpers."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from hpcserve.router.dispatch import batch_size
from hpcserve.router.policies import POLICIES, make_policy, routing_key
from hpcserve.router.radix import PrefixTree
from hpcserve.router.workers import Worker


def _workers(n: int) -> list[Worker]:
    async def build() -> list[Worker]:
        return [Worker(f"w{i}", "both", f"http://127.0.0.1:{20000 + i}") for i in range(n)]
    return asyncio.run(build())


def test_round_robin_alternates():
    ws = _workers(3)
    p = make_policy("round_robin")
    assert [p.pick(ws, None).id for _ in range(6)] == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_least_load_prefers_idle_and_spreads_ties():
    ws = _workers(3)
    p = make_policy("least_load")
    ws[0].inflight, ws[1].inflight, ws[2].inflight = 5, 0, 3
    assert {p.pick(ws, None).id for _ in range(10)} == {"w1"}
    for w in ws:
        w.inflight = 0
    assert set(Counter(p.pick(ws, None).id for _ in range(9)).values()) == {3}  # ties rotate evenly


def test_power_of_two_never_picks_the_busiest_of_two():
    ws = _workers(2)
    ws[0].inflight, ws[1].inflight = 10, 1
    p = make_policy("power_of_two")
    assert {p.pick(ws, None).id for _ in range(50)} == {"w1"}


def test_random_covers_all_workers():
    ws = _workers(3)
    p = make_policy("random")
    assert {p.pick(ws, None).id for _ in range(200)} == {"w0", "w1", "w2"}


def test_cache_aware_keeps_shared_prefixes_on_one_worker_until_imbalance():
    ws = _workers(2)
    p = make_policy("cache_aware", balance_abs_threshold=2, balance_rel_threshold=1.5, cache_threshold=0.5)
    system = "You are a careful assistant who answers in French. " * 4
    first = p.pick(ws, system + "question 0")
    first.inflight += 1
    other = next(w for w in ws if w is not first)
    picks = []
    for i in range(1, 3):  # within the thresholds: follow the prefix even though it is busier
        w = p.pick(ws, system + f"question {i}")
        w.inflight += 1
        picks.append(w.id)
    assert picks == [first.id, first.id]
    # now first has 3 in flight, other 0: 3 - 0 > 2 and 3 > 0 * 1.5 -> least load wins
    assert p.pick(ws, system + "question 9") is other
    # a prompt with nothing in common goes to the worker holding less of the tree
    first.inflight = other.inflight = 0
    assert p.pick(ws, "Completely different text about trains and rivers.") is other


def test_cache_aware_forgets_removed_worker():
    ws = _workers(2)
    p = make_policy("cache_aware")
    w = p.pick(ws, "shared prefix text for forgetting")
    p.forget(w)
    assert p.tree.match("shared prefix text for forgetting", {"w0", "w1"}) == (0, None)
    assert w.id not in p.tree.sizes


def test_prefix_tree_matches_and_is_bounded():
    t = PrefixTree(max_chars=2000)
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.match("hello world and more", {"a", "b"}) == (11, "a")
    assert t.match("hello there", {"a"}) == (6, "a")  # b is not allowed: a holds "hello "
    assert t.match("goodbye", {"a", "b"}) == (0, None)
    for i in range(500):
        t.insert(f"prompt number {i} with some padding text", "a" if i % 2 else "b")
    assert t.total_chars <= 2000
    assert t.sizes["a"] >= 0 and t.sizes["b"] >= 0
    assert t.match("prompt number 499 with some padding text", {"a", "b"}) == (40, "a")  # recent survives


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    assert sorted(POLICIES) == ["cache_aware", "kv_aware", "least_load", "power_of_two", "random", "round_robin"]


@pytest.mark.parametrize("body,key", [
    ({"text": "abc"}, "abc"),
    ({"text": ["first", "second"]}, "first"),
    ({"prompt": "p"}, "p"),
    ({"input_ids": [72, 105]}, "Hi"),
    ({"input_ids": [[72], [73]]}, "H"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "user\x1fhi\x1e"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]},
     "user\x1fa\x1e"),
    ({"nothing": 1}, ""),
])
def test_routing_key(body, key):
    assert routing_key(body) == key


@pytest.mark.parametrize("body,n", [
    ({"text": "one"}, None), ({"text": ["a", "b", "c"]}, 3), ({"input_ids": [1, 2]}, None),
    ({"input_ids": [[1], [2]]}, 2), ({"prompt": ["x", "y"]}, 2), ({"prompt": [1, 2, 3]}, None),
    ({"messages": []}, None),
])
def test_batch_size(body, n):
    assert batch_size(body) == n


def test_breaker_counts_consecutive_failures_only():
    from hpcserve.router.workers import WorkerSet

    async def build() -> WorkerSet:
        ws = WorkerSet("aggregated", eject_after=3, readmit_after=2)
        ws.add_static("both", "http://127.0.0.1:20001")
        return ws

    ws = asyncio.run(build())
    w = ws.workers["both-0"]
    for _ in range(5):  # failures separated by successes never eject
        ws.record_failure(w, "boom")
        ws.record_failure(w, "boom")
        ws.record_success(w)
    assert w.circuit == "closed" and ws.healthy["both"] == [w]
    for _ in range(3):
        ws.record_failure(w, "boom")
    assert (w.circuit, w.ejections, ws.healthy["both"]) == ("open", 1, [])
    ws.record_success(w)
    assert w.circuit == "half_open" and ws.healthy["both"] == []
    ws.record_failure(w, "again")
    assert w.circuit == "open"
    ws.record_success(w)
    ws.record_success(w)
    assert w.circuit == "closed" and ws.healthy["both"] == [w]


@pytest.mark.parametrize("raw", [
    b'{"text":"hi","sampling_params":{"max_new_tokens":4}}',
    b'{}',
    b' { "a" : [1, {"b": "}"}] }\n ',
    b'{"text":"caf\\u00e9 \\"quoted\\""}',
])
def test_bootstrap_splice_adds_fields_without_reserialising(raw):
    import orjson

    from hpcserve.router.pd import splice_bootstrap
    body = orjson.loads(raw)
    out = splice_bootstrap(raw, body, 'host"1', 8998, 12345)
    assert out.startswith(raw.rstrip()[:-1])  # the client's bytes are kept as they came
    assert orjson.loads(out) == {**body, "bootstrap_host": 'host"1', "bootstrap_port": 8998, "bootstrap_room": 12345}


def test_bootstrap_splice_refuses_bodies_with_their_own_fields():
    from hpcserve.router.pd import splice_bootstrap
    assert splice_bootstrap(b'{"bootstrap_room":5}', {"bootstrap_room": 5}, "h", 1, 2) is None
    assert splice_bootstrap(b'{"bootstrap_port":null}', {"bootstrap_port": None}, "h", 1, 2) is None
