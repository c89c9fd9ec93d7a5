"""shared-fs reads what other writers of the directory may have planted (issue 11): symlinks, FIFOs, huge files
and stale blocks are misses; files are private; the directory is capped and swept by age by default."""

from __future__ import annotations

import os
import stat
import time

from pdserve.engine.kv_transfer.stores.shared_fs import DEFAULT_MAX_BYTES, SharedFSStore
from pdserve.engine.kv_transfer.stores.store import block_key


def _store(tmp_path, **kw):
    return SharedFSStore(str(tmp_path / "kv"), "ns", **kw)


def test_a_symlink_is_never_followed(tmp_path):
    store = _store(tmp_path)
    secret = tmp_path / "private.txt"
    secret.write_bytes(b"not KV")
    key = block_key(1)
    os.makedirs(os.path.dirname(store.path_of(key)), exist_ok=True)
    os.symlink(secret, store.path_of(key))
    assert store.get(key) is None


def test_a_fifo_is_a_miss_and_never_blocks(tmp_path):
    store = _store(tmp_path)
    key = block_key(2)
    os.makedirs(os.path.dirname(store.path_of(key)), exist_ok=True)
    os.mkfifo(store.path_of(key))
    t0 = time.monotonic()
    assert store.get(key) is None
    assert time.monotonic() - t0 < 1


def test_a_file_larger_than_a_block_object_is_a_miss(tmp_path):
    store = _store(tmp_path, max_object_bytes=1000)
    store.put(block_key(3), b"x" * 1000)
    store.put(block_key(4), b"x" * 1001)
    assert store.get(block_key(3)) == bytearray(b"x" * 1000)
    assert store.get(block_key(4)) is None


def test_files_are_private_to_the_pod_user(tmp_path):
    store = _store(tmp_path)
    store.put(block_key(5), b"kv")
    path = store.path_of(block_key(5))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) & 0o077 == 0


def test_a_size_cap_by_default_and_stale_blocks_are_swept(tmp_path):
    store = _store(tmp_path, max_age_s=60)
    assert store.max_bytes == DEFAULT_MAX_BYTES
    old, fresh = block_key(6), block_key(7)
    store.put(old, b"o" * 100)
    store.put(fresh, b"f" * 100)
    os.utime(store.path_of(old), (time.time() - 120, time.time() - 120))
    assert store.get(old) is None and not os.path.exists(store.path_of(old))  # too old: gone, a miss
    store.put(old, b"o" * 100)
    os.utime(store.path_of(old), (time.time() - 120, time.time() - 120))
    assert store.evict() == 100  # the sweep removes stale blocks even under the cap
    assert store.contains([old, fresh]) == [False, True]
