"""The KV server and transfer handles under attack (issue 11): call tokens, signed handles, clamps, pulls vs Release.

Real gRPC servers and channels on loopback; the secret is the one tests/conftest.py puts in the environment.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kv_harness import admit, make_request, make_side, prefill
from pdserve.engine.kv_transfer.base import BlockRef, KVHandleError, KVLoadError, KVTransferParams
from pdserve.engine.kv_transfer.grpc.client import KVPullClient, PullError
from pdserve.engine.kv_transfer.grpc.kv_server import (MIN_CHUNK_BYTES, KVTransferServicer, clamp_chunk_bytes,
                                                       start_kv_server)
from pdserve.engine.kv_transfer.grpc.transfers import TransferRegistry
from pdserve.engine.security import ClusterSecret, load_cluster_secret
from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb
from pdserve.proto.pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc

SECRET = load_cluster_secret()


@pytest.fixture
def desc(descriptor):
    return dataclasses.replace(descriptor, model_fingerprint=uuid.uuid4().hex)


@pytest.fixture
def producer(desc):
    side = make_side("grpc", "prefill", desc, {"kv_lease_s": 30.0})
    yield side
    side.close()


def _prefilled(side, rid="r1", n=11):
    _, params = prefill(side, make_request(rid, list(range(n))), [3, 7, 1][: -(-n // 4)])
    return params


def _stub(address):
    return pb_grpc.KVTransferStub(grpc.insecure_channel(address))


# ------------------------------------------------------------------ authentication
def test_every_kv_rpc_without_a_token_or_with_another_secret_is_unauthenticated(producer, desc):
    params = _prefilled(producer)
    stub = _stub(producer.worker.address)
    tid = params["transfer_id"]
    calls = [lambda md: list(stub.PullBlocks(pb.PullBlocksRequest(transfer_id=tid, descriptor=desc.to_proto()),
                                             metadata=md, timeout=5)),
             lambda md: stub.Release(pb.ReleaseRequest(transfer_id=tid), metadata=md, timeout=5),
             lambda md: stub.LocateBlocks(pb.LocateBlocksRequest(transfer_id=tid, descriptor=desc.to_proto()),
                                          metadata=md, timeout=5),
             lambda md: stub.ShareCache(pb.ShareCacheRequest(descriptor=desc.to_proto()), metadata=md, timeout=5)]
    wrong = list(ClusterSecret(b"another-cluster-secret-000").call_headers("kv").items())
    for call in calls:
        for md in ([], wrong, [("x-pdserve-auth", "v1.0.00.00")]):
            with pytest.raises(grpc.RpcError) as err:
                call(md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert tid in producer.worker.registry  # nothing was released by the refused calls


def test_a_kv_server_does_not_start_without_the_cluster_secret(desc):
    servicer = KVTransferServicer(TransferRegistry(), desc, lambda: [])
    with pytest.raises(ValueError, match="needs the cluster secret"):
        start_kv_server(servicer, "127.0.0.1", 0, None)


def test_a_decode_client_with_another_secret_fails_the_load_as_unauthenticated(producer, desc):
    params = _prefilled(producer)
    client = KVPullClient(desc, ClusterSecret(b"another-cluster-secret-000"))
    refs = [BlockRef(0, int(h, 16), 4, i) for i, h in enumerate(params["block_hashes"][:2])]
    try:
        with pytest.raises(PullError) as err:
            client.pull(producer.worker.address, params["transfer_id"], refs, 5.0, lambda r, p: None)
        assert err.value.reason == "unauthenticated"
    finally:
        client.close()


def test_a_guessed_transfer_id_finds_nothing(producer, desc):
    params = _prefilled(producer, rid="r1")
    assert params["transfer_id"] != "r1" and len(bytes.fromhex(params["transfer_id"])) == 16
    client = KVPullClient(desc, SECRET)
    try:
        with pytest.raises(PullError) as err:
            client.pull(producer.worker.address, "r1", [BlockRef(0, 1, 4, 0)], 5.0, lambda r, p: None)
        assert err.value.reason == "lease_expired"  # NOT_FOUND: the request id names no transfer
    finally:
        client.close()


# ------------------------------------------------------------------ signed handles
def test_a_signed_handle_verifies_and_any_change_breaks_it(descriptor):
    handle = KVTransferParams(connector="grpc", transfer_id="ab" * 16, num_tokens=9, block_hashes=(1, 2),
                              descriptor=descriptor.to_dict(), kv_server="10.0.0.1:5000").signed(SECRET, 60)
    handle.verify(SECRET)
    KVTransferParams.from_dict(handle.to_dict()).verify(SECRET)
    for forged in (dataclasses.replace(handle, kv_server="10.6.6.6:5000"),
                   dataclasses.replace(handle, block_hashes=(1, 3)),
                   dataclasses.replace(handle, expires_at=handle.expires_at + 3600)):
        with pytest.raises(KVHandleError, match="does not verify"):
            forged.verify(SECRET)
    with pytest.raises(KVHandleError, match="does not verify"):
        handle.verify(ClusterSecret(b"another-cluster-secret-000"))
    with pytest.raises(KVHandleError, match="not signed"):
        dataclasses.replace(handle, mac="").verify(SECRET)
    with pytest.raises(KVHandleError, match="expired"):
        handle.verify(SECRET, now=handle.expires_at + 1)


def test_a_malformed_handle_gets_a_message_without_python_reprs(descriptor):
    good = KVTransferParams(connector="grpc", transfer_id="t", num_tokens=4, block_hashes=(1,),
                            descriptor=descriptor.to_dict()).to_dict()
    cases = {"lacks 'block_hashes'": {k: v for k, v in good.items() if k != "block_hashes"},
             "block_hashes is malformed": {**good, "block_hashes": "zz"},
             "num_tokens is malformed": {**good, "num_tokens": "many"},
             "descriptor is malformed": {**good, "descriptor": [1]}}
    for message, data in cases.items():
        with pytest.raises(KVHandleError) as err:
            KVTransferParams.from_dict(data)
        assert message in str(err.value)
        assert "Error(" not in str(err.value)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_forged_handle_is_never_dialled(desc, policy):
    """A handle pointing at an unknown KV server with a made-up MAC: no connection is attempted."""
    decoy = grpc.server(ThreadPoolExecutor(1))
    seen = []

    class Spy(pb_grpc.KVTransferServicer):
        def PullBlocks(self, request, context):
            seen.append(request.transfer_id)
            return iter(())

    pb_grpc.add_KVTransferServicer_to_server(Spy(), decoy)
    port = decoy.add_insecure_port("127.0.0.1:0")
    decoy.start()
    d = make_side("grpc", "decode", desc, {"load_failure_policy": policy})
    try:
        forged = KVTransferParams(connector="grpc", transfer_id="ab" * 16, num_tokens=8, block_hashes=(1, 2),
                                  descriptor=desc.to_dict(), kv_server=f"127.0.0.1:{port}",
                                  expires_at=time.time() + 60, mac="00" * 32)
        req = make_request("r1", list(range(8)), [1], forged.to_dict())
        if policy == "fail":
            with pytest.raises(KVLoadError, match="does not verify"):
                admit(d, req, [0, 1])
        else:
            assert admit(d, req, [0, 1]) == 0
        time.sleep(0.2)
        assert seen == []
        assert d.sched.stats.snapshot().failures == {"bad_handle": 1}
    finally:
        d.close()
        decoy.stop(None)


# ------------------------------------------------------------------ limits
def test_chunk_bytes_is_clamped_to_a_floor_and_a_ceiling():
    assert clamp_chunk_bytes(1) == MIN_CHUNK_BYTES
    assert clamp_chunk_bytes(0) > MIN_CHUNK_BYTES  # the default
    assert clamp_chunk_bytes(2**31) < 64 << 20


def test_a_pull_asking_for_one_byte_chunks_gets_whole_blocks(producer, desc):
    params = _prefilled(producer)
    stub = _stub(producer.worker.address)
    md = list(SECRET.call_headers("kv").items())
    msgs = list(stub.PullBlocks(pb.PullBlocksRequest(transfer_id=params["transfer_id"], descriptor=desc.to_proto(),
                                                     chunk_bytes=1), metadata=md, timeout=5))
    assert len(msgs) == 3  # one message per block (each far below the floor), not one per byte


def test_pin_seconds_inf_and_nan_are_refused_and_huge_is_clamped_to_the_lease(producer, desc):
    params = _prefilled(producer)
    stub = _stub(producer.worker.address)
    md = list(SECRET.call_headers("kv").items())
    for pin in (math.inf, math.nan):
        with pytest.raises(grpc.RpcError) as err:
            stub.LocateBlocks(pb.LocateBlocksRequest(transfer_id=params["transfer_id"], descriptor=desc.to_proto(),
                                                     pin_seconds=pin), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.LocateBlocks(pb.LocateBlocksRequest(transfer_id=params["transfer_id"], descriptor=desc.to_proto(),
                                             pin_seconds=1e30), metadata=md, timeout=5)
    # Pinned for at most the lease (30 s): expired a little later, so nothing leaks.
    assert producer.worker.registry.expire(time.monotonic() + 31) == [params["transfer_id"]]


# ------------------------------------------------------------------ Release during a pull
def test_release_during_a_pull_frees_the_blocks_only_when_the_pull_ends():
    reg = TransferRegistry()
    reg.add("t", [BlockRef(4, 1, 16, 0)], lease_s=60.0)
    assert reg.begin_pull("t") == (BlockRef(4, 1, 16, 0),)
    assert reg.release("t") is True
    assert reg.take_released() == set() and "t" in reg  # still pinned by the pull
    assert reg.begin_pull("t") is None and reg.pin("t", 5) is None  # no new readers of a released transfer
    assert reg.release("t") is False  # idempotent
    reg.end_pull("t")
    assert reg.take_released() == {"t"} and "t" not in reg and len(reg) == 0


def test_the_routers_release_of_an_abandoned_transfer_frees_the_prefill_blocks(producer):
    """The router's real gRPC backend releases a verified handle at the real KV server; a forged one is not
    dialled."""
    import asyncio

    from kv_harness import wait_for
    from pdserve.services.router.backend import GrpcPodBackend

    params = _prefilled(producer)
    handle = KVTransferParams.from_dict(params).to_proto()
    forged = KVTransferParams.from_dict({**params, "mac": "00" * 32}).to_proto()
    backend = GrpcPodBackend(cluster_secret=SECRET)
    asyncio.run(backend.release_transfer(forged))
    assert params["transfer_id"] in producer.worker.registry
    asyncio.run(backend.release_transfer(handle))
    wait_for(producer, lambda: "r1" in producer.released)
    assert producer.sched.stats.snapshot().blocks_held == 0


def test_a_release_or_pull_that_comes_before_the_registration_is_not_lost():
    """The handle reaches the decode pod one engine step before the worker registers the transfer."""
    reg = TransferRegistry()
    assert reg.release("early") is False  # remembered
    reg.add("early", [BlockRef(4, 1, 16, 0)], lease_s=60.0)
    assert reg.take_released() == {"early"} and "early" not in reg
    late = []
    import threading
    puller = threading.Thread(target=lambda: late.append(reg.begin_pull("late", wait_s=5.0)))
    puller.start()
    time.sleep(0.1)
    reg.add("late", [BlockRef(5, 2, 16, 0)], lease_s=60.0)
    puller.join(5)
    assert late == [(BlockRef(5, 2, 16, 0),)]
