"""The grpc connector's transports on CPU: ``auto`` streams when a cache is not on a GPU, ``ipc`` then fails the
load as ``ipc_unavailable`` (the prefill side is still released), and the KV server's IPC calls (``ShareCache``,
``LocateBlocks``) answer exactly. The device-to-device copy itself is tested on a GPU (test_disagg_gpu.py)."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import grpc
import pytest

from kv_harness import admit, make_request, make_side, prefill, same_kv, wait_for

from pdserve.engine.kv_transfer.grpc import cuda_ipc
from pdserve.engine.kv_transfer.base import BlockRef
from pdserve.engine.kv_transfer.grpc.client import KVPullClient, PullError
from pdserve.engine.kv_transfer.grpc.transfers import TransferRegistry
from pdserve.engine.security import load_cluster_secret


@pytest.fixture
def desc(descriptor):
    return dataclasses.replace(descriptor, model_fingerprint=uuid.uuid4().hex)


def _pair(desc, transport):
    opts = {"kv_load_timeout_s": 2.0, "kv_transport": transport}
    return make_side("grpc", "prefill", desc, opts), make_side("grpc", "decode", desc, opts, fill="zeros")


def test_auto_streams_between_cpu_caches(desc):
    p, d = _pair(desc, "auto")
    try:
        prompt = list(range(11))  # blocks of 4 tokens: 4 + 4 + 3
        _, params = prefill(p, make_request("r1", prompt), [3, 7, 1])
        assert admit(d, make_request("r1", prompt, [1], params), [5, 2, 0]) == 11
        wait_for(d, lambda: "r1" in d.output.finished_loading)
        assert same_kv(p, [3, 7, 1], d, [5, 2, 0], 11, desc.block_size)
        assert d.worker.loads_by_transport == {"stream": 1, "ipc": 0}
        wait_for(p, lambda: "r1" in p.released)
    finally:
        p.close()
        d.close()


def test_forced_ipc_without_a_gpu_is_a_counted_miss_and_frees_the_peer(desc):
    p, d = _pair(desc, "ipc")
    try:
        _, params = prefill(p, make_request("r1", list(range(6))), [0, 1])
        assert admit(d, make_request("r1", list(range(6)), [1], params), [0, 1]) == 6
        wait_for(d, lambda: "r1" in d.output.failed_loading)
        assert d.output.failed_loading["r1"].reason == "ipc_unavailable"
        assert d.sched.stats.snapshot().failures == {"ipc_unavailable": 1}
        wait_for(p, lambda: "r1" in p.released)  # the decode side gave the transfer back at once
    finally:
        p.close()
        d.close()


def test_unknown_transport_is_refused(desc):
    with pytest.raises(ValueError, match="unknown kv_transport 'nvlink'"):
        make_side("grpc", "decode", desc, {"kv_transport": "nvlink"})


def test_locate_blocks_names_the_peer_block_ids_and_checks_hashes(desc):
    p = make_side("grpc", "prefill", desc, {})
    client = KVPullClient(desc, load_cluster_secret())
    try:
        prompt = list(range(7))  # blocks of 4 tokens: 4 + 3
        _, params = prefill(p, make_request("r1", prompt), [3, 7])
        hashes = [int(h, 16) for h in params["block_hashes"]]
        refs = [BlockRef(-1, hashes[0], 4, 0), BlockRef(-1, hashes[1], 3, 1)]
        tid = params["transfer_id"]  # a random token, not the request id
        assert tid != "r1" and len(bytes.fromhex(tid)) == 16
        assert client.locate(p.worker.address, tid, refs, 5.0) == ("", [3, 7])
        assert client.locate(p.worker.address, tid, refs[1:], 5.0) == ("", [7])  # decode-side prefix reuse
        with pytest.raises(PullError) as bad_hash:
            client.locate(p.worker.address, tid, [BlockRef(-1, hashes[0] ^ 1, 4, 0)], 5.0)
        assert bad_hash.value.reason == "missing"
        with pytest.raises(PullError) as unknown:
            client.locate(p.worker.address, "nope", refs, 5.0)
        assert unknown.value.reason == "lease_expired"
        other = KVPullClient(dataclasses.replace(desc, block_size=desc.block_size * 2), load_cluster_secret())
        with pytest.raises(PullError) as incompatible:
            other.locate(p.worker.address, tid, refs, 5.0)
        assert incompatible.value.reason == "incompatible"
        other.close()
    finally:
        client.close()
        p.close()


def test_share_cache_refuses_a_cpu_cache_and_another_node(desc):
    p = make_side("grpc", "prefill", desc, {})
    client = KVPullClient(desc, load_cluster_secret())
    try:
        with pytest.raises(grpc.RpcError) as cpu:
            client.share_cache(p.worker.address, cuda_ipc.node_id(), 5.0)
        assert cpu.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "not on a GPU" in cpu.value.details()
    finally:
        client.close()
        p.close()


def test_pin_keeps_a_transfer_past_its_lease():
    reg = TransferRegistry()
    reg.add("t", [BlockRef(4, 1, 16, 0)], lease_s=0.0)
    assert reg.pin("t", 30.0) == (BlockRef(4, 1, 16, 0),)
    assert reg.expire(time.monotonic() + 10) == []
    assert reg.expire(time.monotonic() + 31) == ["t"]
    assert reg.pin("t", 30.0) is None


class _StuckStream:
    """A server stream as grpc's core can leave one when its server stops under it (both ends in one process): no
    message, no end, no deadline, and ``cancel()`` does not wake the reader."""

    def __init__(self) -> None:
        self.cancelled = False
        self._never = threading.Event()

    def __iter__(self):
        self._never.wait()
        return iter(())

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_a_stream_that_misses_its_deadline_still_ends_the_pull(desc, monkeypatch):
    """The pull gives up a grace period past its deadline and cancels the call; the load fails as a timeout (the
    race once hung test_request_without_first_token_still_computes_its_last_prompt_token[grpc] in shutdown)."""
    from pdserve.engine.kv_transfer.grpc import client as client_module

    monkeypatch.setattr(client_module, "_DEADLINE_GRACE_S", 0.2)
    stuck = _StuckStream()

    class Stub:
        def PullBlocks(self, *args, **kwargs):
            return stuck

    client = KVPullClient(desc, load_cluster_secret())
    monkeypatch.setattr(client, "_stub", lambda address: Stub())
    start = time.monotonic()
    with pytest.raises(PullError) as err:
        client.pull("127.0.0.1:1", "t", [BlockRef(0, 1, 4, 0)], 0.1, lambda ref, payload: None)
    assert err.value.reason == "timeout" and "past the 0.1 s deadline" in str(err.value)
    assert stuck.cancelled and time.monotonic() - start < 2.0
