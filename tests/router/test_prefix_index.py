"""Exact and approximate prefix indexes: table-driven event sequences with exact expected matches."""

from __future__ import annotations

import pytest
from router_builders import hasher

from pdserve.engine.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from pdserve.services.router.prefix_index import ApproxPrefixIndex, PrefixIndex, PrefixTracker

H = hasher().hash_prefix(list(range(1, 17)))  # 4 chained block hashes of one prompt
OTHER = hasher().hash_prefix(list(range(100, 116)))


def stored(hashes):
    return BlockStored(tuple(hashes), None, (), 4)


EXACT_CASES = [
    # (id, [(pod, event)], query hashes, expected per pod)
    ("empty", [], H, {"a": 0, "b": 0}),
    ("stored-full", [("a", stored(H))], H, {"a": 4, "b": 0}),
    ("stored-prefix", [("a", stored(H[:2])), ("b", stored(H[:3]))], H, {"a": 2, "b": 3}),
    ("removed-tail", [("a", stored(H)), ("a", BlockRemoved((H[3],)))], H, {"a": 3, "b": 0}),
    # A hole in the chain ends the usable prefix even if later blocks are still held.
    ("removed-middle", [("a", stored(H)), ("a", BlockRemoved((H[1],)))], H, {"a": 1, "b": 0}),
    ("removed-other-pod-only", [("a", stored(H)), ("b", stored(H)), ("b", BlockRemoved(tuple(H)))], H,
     {"a": 4, "b": 0}),
    ("cleared", [("a", stored(H)), ("b", stored(H)), ("a", AllBlocksCleared())], H, {"a": 0, "b": 4}),
    ("unrelated", [("a", stored(OTHER))], H, {"a": 0, "b": 0}),
    ("remove-unknown-is-harmless", [("a", BlockRemoved(tuple(H)))], H, {"a": 0, "b": 0}),
]


@pytest.mark.parametrize("events,query,expected", [c[1:] for c in EXACT_CASES], ids=[c[0] for c in EXACT_CASES])
def test_exact_index(events, query, expected):
    index = PrefixIndex()
    for pod, event in events:
        index.apply(pod, event)
    assert index.match(query, ["a", "b"]) == expected


def test_exact_index_forgets_a_removed_pod_completely():
    index = PrefixIndex()
    index.apply("a", stored(H))
    index.apply("b", stored(H[:1]))
    index.remove_pod("a")
    assert index.num_blocks("a") == 0
    assert index._pods_of == {H[0]: {"b"}}  # no leftovers that would grow without bound


APPROX_CASES = [
    # (id, capacity, [(pod, hashes, time)], query, now, max_age, expected)
    ("recent", 100, [("a", H, 0.0)], H, 5.0, 10.0, {"a": 4, "b": 0}),
    ("expired", 100, [("a", H, 0.0)], H, 50.0, 10.0, {"a": 0, "b": 0}),
    ("refresh-keeps", 100, [("a", H, 0.0), ("a", H[:2], 45.0)], H, 50.0, 10.0, {"a": 2, "b": 0}),
    # LRU capacity: the oldest hashes (the prompt's start) go first, so the prefix is lost.
    ("lru-evicts-oldest", 4, [("a", H, 0.0), ("a", OTHER[:2], 1.0)], H, 2.0, 10.0, {"a": 0, "b": 0}),
]


@pytest.mark.parametrize("capacity,sends,query,now,max_age,expected", [c[1:] for c in APPROX_CASES],
                         ids=[c[0] for c in APPROX_CASES])
def test_approx_index(capacity, sends, query, now, max_age, expected):
    index = ApproxPrefixIndex(capacity)
    for pod, hashes, t in sends:
        index.record(pod, hashes, t)
    assert index.match(query, ["a", "b"], now, max_age) == expected


def test_tracker_removed_event_also_clears_pending_sends():
    tracker = PrefixTracker(pending_ttl_s=10)
    tracker.on_routed("a", H, now=0.0)
    tracker.on_event("a", stored(H))
    tracker.on_event("a", BlockRemoved((H[2], H[3])))
    assert tracker.matched_blocks(H, [("a", True)], now=1.0) == {"a": 2}
    assert tracker.matched_blocks(H, [("a", False)], now=1.0) == {"a": 2}
