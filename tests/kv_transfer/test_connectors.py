"""Every connector, producer to consumer, on real KV cache tensors: what arrives is exactly what was computed,
partial last blocks included; prefix reuse; and each failure is a counted miss (or a clear error under ``fail``)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Iterator

import pytest

from kv_harness import admit, make_request, make_side, prefill, same_kv, wait_for

from pdserve.engine.kv_transfer.base import KVLoadError
from pdserve.engine.kv_transfer.stores.store import block_key

CONNECTORS = ["shared-fs", "redis", "grpc"]


@pytest.fixture
def options(tmp_path, redis_url):
    def make(connector: str, **extra):
        base = {"kv_load_timeout_s": 0.5}
        if connector == "shared-fs":
            base["kv_path"] = str(tmp_path / "kv")
        if connector == "redis":
            base["redis_url"] = redis_url
        return {**base, **extra}
    return make


@pytest.fixture
def desc(descriptor):
    # A fingerprint per test keeps tests apart in the session's Redis.
    return dataclasses.replace(descriptor, model_fingerprint=uuid.uuid4().hex)


def settle(side, held: bool) -> None:
    """Wait until a producer's held request is released (its saves are written)."""
    if held:
        wait_for(side, lambda: "r1" in side.released)
    wait_for(side, lambda: not side.worker.has_pending_work())


@contextlib.contextmanager
def sides(p, d) -> Iterator[tuple]:
    """Close both sides (the producer first) however the test ends."""
    try:
        yield p, d
    finally:
        p.close()
        d.close()


def _pair(connector, desc, options, **extra):
    return (make_side(connector, "prefill", desc, options(connector, **extra)),
            make_side(connector, "decode", desc, options(connector, **extra), fill="zeros"))


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("prompt_len,chunk", [(8, None), (11, None), (11, 3), (1, None)])
def test_prefill_to_decode_moves_exactly_the_prompt_kv(connector, prompt_len, chunk, desc, options):
    with sides(*_pair(connector, desc, options)) as (p, d):
        prompt = list(range(100, 100 + prompt_len))
        p_blocks, d_blocks = [3, 7, 1, 9], [5, 2, 8, 0]
        hold, params = prefill(p, make_request("r1", prompt), p_blocks, chunk)
        assert params["num_tokens"] == prompt_len and params["connector"] == connector
        assert hold or connector != "grpc"  # a store may have finished writing already
        settle(p, hold and connector != "grpc")
        req = make_request("r1", prompt, output=[42], params=params)
        assert admit(d, req, d_blocks) == prompt_len  # all of the prompt, partial block included
        wait_for(d, lambda: "r1" in d.output.finished_loading)
        assert same_kv(p, p_blocks, d, d_blocks, prompt_len, desc.block_size)
        if connector == "grpc":
            wait_for(p, lambda: "r1" in p.released)  # the decode side released the transfer
        wait_for(p, lambda: not p.sched.has_pending_work())
        assert p.sched.stats.blocks_held == 0 and not p.sched.has_pending_work()
        assert d.sched.stats.snapshot().blocks["load"] == -(-prompt_len // desc.block_size)


@pytest.mark.parametrize("connector", CONNECTORS)
def test_decode_loads_only_the_blocks_it_lacks(connector, desc, options):
    with sides(*_pair(connector, desc, options)) as (p, d):
        prompt = list(range(14))
        hold, params = prefill(p, make_request("r1", prompt), [0, 1, 2, 3])
        settle(p, hold and connector != "grpc")
        req = make_request("r1", prompt, output=[7], params=params)
        assert admit(d, req, [4, 5, 6, 7], num_local=8) == 6  # two blocks hit locally: 6 tokens to load
        wait_for(d, lambda: "r1" in d.output.finished_loading)
        assert d.sched.stats.snapshot().blocks["load"] == 2
        assert same_kv(p, [2, 3], d, [6, 7], 6, desc.block_size)
        assert not d.caches[0][:, 4].any()  # local blocks untouched


@pytest.mark.parametrize("connector", CONNECTORS)
def test_request_without_first_token_still_computes_its_last_prompt_token(connector, desc, options):
    with sides(*_pair(connector, desc, options)) as (p, d):
        prompt = list(range(8))
        hold, params = prefill(p, make_request("r1", prompt), [0, 1])
        settle(p, hold and connector != "grpc")
        assert admit(d, make_request("r1", prompt, params=params), [0, 1]) == 7


def _corrupt_second_block(connector, p, params, tmp_path):
    key = block_key(int(params["block_hashes"][1], 16))
    store = p.sched.store
    blob = bytearray(store.get(key))
    blob[-1] ^= 0xFF
    store.put(key, bytes(blob))


@pytest.mark.parametrize("connector", ["shared-fs", "redis"])
def test_corrupted_block_loads_the_valid_prefix_and_reports_checksum(connector, desc, options, tmp_path):
    with sides(*_pair(connector, desc, options)) as (p, d):
        prompt = list(range(12))
        hold, params = prefill(p, make_request("r1", prompt), [0, 1, 2])
        settle(p, hold)
        _corrupt_second_block(connector, p, params, tmp_path)
        assert admit(d, make_request("r1", prompt, [1], params), [3, 4, 5]) == 12
        wait_for(d, lambda: "r1" in d.output.failed_loading)
        failure = d.output.failed_loading["r1"]
        assert failure.reason == "checksum" and failure.num_valid_blocks == 1
        assert d.sched.stats.snapshot().failures == {"checksum": 1}


@pytest.mark.parametrize("connector", ["shared-fs", "redis"])
def test_missing_block_waits_then_loads_what_is_there(connector, desc, options):
    with sides(*_pair(connector, desc, options)) as (p, d):
        prompt = list(range(12))
        hold, params = prefill(p, make_request("r1", prompt), [0, 1, 2])
        settle(p, hold)
        p.sched.store.delete(block_key(int(params["block_hashes"][2], 16)))
        req = make_request("r1", prompt, [1], params)
        assert admit(d, req, [3, 4, 5]) is None  # ask again later: the prefill may still be writing
        time.sleep(0.6)
        assert admit(d, req, [3, 4, 5]) == 8  # timed out: the two blocks that exist
        assert d.sched.stats.snapshot().failures == {"missing": 1}


@pytest.mark.parametrize("connector", CONNECTORS)
def test_fail_policy_raises_a_clear_error(connector, desc, options):
    p = make_side(connector, "prefill", desc, options(connector))
    other = dataclasses.replace(desc, dtype="bfloat16")
    d = make_side(connector, "decode", other, options(connector, load_failure_policy="fail"), fill="zeros")
    with sides(p, d):
        _, params = prefill(p, make_request("r1", list(range(6))), [0, 1])
        with pytest.raises(KVLoadError, match="incompatible.*dtype"):
            admit(d, make_request("r1", list(range(6)), [1], params), [0, 1])


@pytest.mark.parametrize("connector", CONNECTORS)
def test_incompatible_peer_is_a_miss_under_recompute(connector, desc, options):
    p = make_side(connector, "prefill", desc, options(connector))
    d = make_side(connector, "decode", dataclasses.replace(desc, dtype="bfloat16"), options(connector),
                  fill="zeros")
    with sides(p, d):
        _, params = prefill(p, make_request("r1", list(range(6))), [0, 1])
        assert admit(d, make_request("r1", list(range(6)), [1], params), [0, 1]) == 0
        assert d.sched.stats.snapshot().failures == {"incompatible": 1}


def test_redis_down_is_a_miss(desc, options):
    from pdserve.cli.local_servers import free_port

    opts = options("redis", redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.3)
    d = make_side("redis", "decode", desc, opts, fill="zeros")
    p = make_side("redis", "prefill", desc, opts)
    with sides(p, d):
        hold, params = prefill(p, make_request("r1", list(range(6))), [0, 1])
        settle(p, hold)  # the failed save still releases the blocks
        assert admit(d, make_request("r1", list(range(6)), [1], params), [0, 1]) == 0
        assert d.sched.stats.snapshot().failures == {"store_unavailable": 1}
        assert p.sched.stats.snapshot().failures == {"store_unavailable": 1}


def test_grpc_lease_expires_and_a_late_pull_fails_as_lease_expired(desc, options):
    with sides(*_pair("grpc", desc, options, kv_lease_s=0.2)) as (p, d):
        _, params = prefill(p, make_request("r1", list(range(6))), [0, 1])
        assert p.sched.stats.blocks_held == 2
        wait_for(p, lambda: "r1" in p.released)
        assert p.sched.stats.blocks_held == 0 and p.sched.stats.snapshot().failures == {"lease_expired": 1}
        assert admit(d, make_request("r1", list(range(6)), [1], params), [0, 1]) == 6
        wait_for(d, lambda: "r1" in d.output.failed_loading)
        assert d.output.failed_loading["r1"].reason == "lease_expired"


def test_grpc_dead_prefill_is_peer_gone(desc, options):
    p, d = _pair("grpc", desc, options)
    try:
        _, params = prefill(p, make_request("r1", list(range(6))), [0, 1])
        p.close()
        assert admit(d, make_request("r1", list(range(6)), [1], params), [0, 1]) == 6
        wait_for(d, lambda: "r1" in d.output.failed_loading)
        assert d.output.failed_loading["r1"].reason == "peer_gone"
    finally:
        d.close()


@pytest.mark.parametrize("connector", ["shared-fs", "redis"])
def test_store_prefix_is_reused_without_a_handle(connector, desc, options):
    """Any decode pod reuses any prefix that any prefill pod stored, even for a request it gets directly."""
    with sides(*_pair(connector, desc, options)) as (p, d):
        hold, _ = prefill(p, make_request("r1", list(range(10))), [0, 1, 2])
        settle(p, hold)
        req = make_request("r2", list(range(9)) + [99, 98, 97])  # shares two full blocks
        assert admit(d, req, [4, 5, 6]) == 8
        wait_for(d, lambda: "r2" in d.output.finished_loading)
        assert same_kv(p, [0, 1], d, [4, 5], 8, desc.block_size)


def test_handle_from_another_connector_is_refused_at_once(desc, options):
    p = make_side("grpc", "prefill", desc, options("grpc"))
    d = make_side("shared-fs", "decode", desc, options("shared-fs"), fill="zeros")
    with sides(p, d):
        _, params = prefill(p, make_request("r1", list(range(6))), [0, 1])
        assert admit(d, make_request("r1", list(range(6)), [1], params), [0, 1]) == 0  # no waiting for writes
        assert d.sched.stats.snapshot().failures == {"incompatible": 1}
