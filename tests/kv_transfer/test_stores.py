"""The two block stores against real backends: a temporary directory and a real redis-server."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pdserve.cli.local_servers import LocalRedis, free_port
from pdserve.engine.kv_transfer.stores.redis_store import RedisStore
from pdserve.engine.kv_transfer.stores.shared_fs import SharedFSStore
from pdserve.engine.kv_transfer.stores.store import StoreUnavailableError, block_key


@pytest.fixture(params=["shared-fs", "redis"])
def store(request, tmp_path, redis_url):
    ns = f"ns-{request.node.name}-{time.monotonic_ns()}"
    s = SharedFSStore(str(tmp_path), ns) if request.param == "shared-fs" else RedisStore(redis_url, ns)
    yield s
    s.close()


def test_put_get_contains_delete(store):
    keys = [block_key(h) for h in (1, 2, 2**64 - 1)]
    assert store.get(keys[0]) is None
    store.put(keys[0], b"a" * 100)
    store.put(keys[1], bytearray(b"b" * 50))
    assert store.get(keys[0]) == b"a" * 100
    assert store.get_many(keys) == [b"a" * 100, b"b" * 50, None]
    assert store.contains(keys) == [True, True, False]
    assert store.count_prefix(keys) == 2 and store.count_prefix(keys[1:]) == 1
    store.delete(keys[0])
    assert store.contains(keys[:1]) == [False]


def test_shared_fs_readers_never_see_half_a_block(tmp_path):
    """Writers rename finished files into place: a concurrent reader gets the whole object or nothing."""
    store = SharedFSStore(str(tmp_path), "ns")
    key, sizes, stop, bad = block_key(42), (1 << 20, 3 << 20), threading.Event(), []

    def reader():
        while not stop.is_set():
            data = store.get(key)
            if data is not None and (len(data) not in sizes or len(set(data[:: 4096])) != 1):
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(20):
        store.put(key, bytes([i % 250 + 1]) * sizes[i % 2])
    stop.set()
    t.join()
    assert not bad
    assert not [n for n in os.listdir(os.path.dirname(store.path_of(key))) if ".tmp-" in n]


def test_shared_fs_size_cap_evicts_least_recently_used(tmp_path):
    # No age limit here: the mtimes below are set in 1970 to order the blocks (ages have their own test).
    store = SharedFSStore(str(tmp_path), "ns", max_bytes=10_000, max_age_s=float("inf"))
    keys = [block_key(i) for i in range(6)]
    for i, key in enumerate(keys[:4]):
        store.put(key, b"x" * 2000)
        os.utime(store.path_of(key), (1000 + i, 1000 + i))  # deterministic ages: key 0 oldest
    store.get(keys[0])  # a read makes key 0 the most recently used
    for key in keys[4:]:
        store.put(key, b"y" * 2000)
    assert store.total_bytes() <= 10_000
    present = dict(zip(keys, store.contains(keys)))
    assert [present[k] for k in keys] == [True, False, False, True, True, True]  # oldest untouched went first


def test_shared_fs_cleans_stale_temporary_files(tmp_path):
    store = SharedFSStore(str(tmp_path), "ns", max_bytes=1 << 30)
    store.put(block_key(1), b"z")
    stale = store.path_of(block_key(1)) + ".tmp-dead"
    with open(stale, "wb") as f:
        f.write(b"half")
    os.utime(stale, (0, 0))
    store.evict()
    assert not os.path.exists(stale)


def test_redis_ttl_expires_and_reads_renew(redis_url):
    store = RedisStore(redis_url, f"ttl-{time.monotonic_ns()}", ttl_s=1)
    store.put("a", b"1")
    store.put("b", b"2")
    time.sleep(0.6)
    assert store.get("a") == b"1"  # renews a's TTL
    time.sleep(0.6)
    assert store.contains(["a", "b"]) == [True, False]


def test_redis_budget_evicts_least_recently_used_and_keeps_accounting(redis_url):
    store = RedisStore(redis_url, f"budget-{time.monotonic_ns()}", max_bytes=3000)
    for k in "abc":
        store.put(k, b"x" * 1000)
        time.sleep(0.002)  # distinct millisecond scores
    store.get("a")
    time.sleep(0.002)
    store.put("d", b"y" * 1000)
    assert store.contains(list("abcd")) == [True, False, True, True]
    assert store.total_bytes() == 3000
    store.put("d", b"y" * 500)  # overwrite: accounted once
    assert store.total_bytes() == 2500


def test_redis_down_fails_fast_with_a_clear_error():
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", "down", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        store.contains(["a"])
    with pytest.raises(StoreUnavailableError):
        store.put("a", b"1")
    assert time.monotonic() - t0 < 3


def test_redis_server_that_goes_away_and_comes_back():
    server = LocalRedis().start()
    try:
        store = RedisStore(server.url, "flaky", timeout_s=0.5)
        store.put("k", b"v")
        port = server.port
        server.stop()
        with pytest.raises(StoreUnavailableError):
            store.get("k")
        server = LocalRedis(port=port).start()
        assert store.get("k") is None  # a fresh server: a miss, no error
    finally:
        server.stop()
