"""The block object: round trip, and every way a reader refuses one."""

from __future__ import annotations

import dataclasses
import os

import pytest

from pdserve.engine.kv_transfer.base import KVTransferParams
from pdserve.engine.kv_transfer.block_format import (ChecksumError, IncompatibleDescriptorError, KVDescriptor,
                                                     KVFormatError, decode_block, encode_block)


def _payload(desc: KVDescriptor, num_tokens: int | None = None) -> bytes:
    return os.urandom(desc.payload_bytes(num_tokens))


def test_round_trip_full_and_partial(descriptor):
    for n in (descriptor.block_size, 1, 3):
        payload = _payload(descriptor, n)
        blob = encode_block(descriptor, 0xDEADBEEF12345678, n, payload)
        header, view = decode_block(blob, descriptor, 0xDEADBEEF12345678, n)
        assert bytes(view) == payload
        assert (header.num_tokens, header.block_hash, header.payload_bytes) == (n, 0xDEADBEEF12345678, len(payload))


@pytest.mark.parametrize("change", [dict(dtype="bfloat16"), dict(block_size=8), dict(num_layers=4),
                                    dict(num_kv_heads=1), dict(head_dim=16), dict(hash_seed_id=1),
                                    dict(hash_algo="blake2b"), dict(model_fingerprint="other"),
                                    dict(tp_rank=1, tp_size=2), dict(dtype="float8_e4m3fn")])
def test_incompatible_descriptor_is_refused_with_the_field_named(descriptor, change):
    writer = dataclasses.replace(descriptor, **change)
    blob = encode_block(writer, 7, writer.block_size, _payload(writer))
    with pytest.raises(IncompatibleDescriptorError) as info:
        decode_block(blob, descriptor)
    assert next(iter(change)) in str(info.value)


def test_bad_checksum_truncation_magic_and_identity(descriptor):
    payload = bytearray(_payload(descriptor))
    blob = bytearray(encode_block(descriptor, 5, descriptor.block_size, payload))
    corrupted = bytearray(blob)
    corrupted[-10] ^= 0xFF
    with pytest.raises(ChecksumError, match="checksum"):
        decode_block(corrupted, descriptor)
    with pytest.raises(KVFormatError, match="truncated"):
        decode_block(blob[:-1], descriptor)
    with pytest.raises(KVFormatError, match="magic"):
        decode_block(b"XXXX" + blob[4:], descriptor)
    with pytest.raises(KVFormatError, match="returned for"):
        decode_block(blob, descriptor, block_hash=6)
    with pytest.raises(KVFormatError, match="too short"):
        decode_block(b"PD", descriptor)


def test_encode_refuses_a_payload_of_the_wrong_size(descriptor):
    with pytest.raises(ValueError, match="does not match"):
        encode_block(descriptor, 1, 4, b"\0" * 10)
    with pytest.raises(ValueError, match="1..4 tokens"):
        encode_block(descriptor, 1, 5, _payload(descriptor, 5))


def test_descriptor_validation_and_namespace(descriptor):
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        dataclasses.replace(descriptor, dtype="int4")
    assert descriptor.namespace == dataclasses.replace(descriptor, dtype="bfloat16").namespace
    assert descriptor.namespace != dataclasses.replace(descriptor, model_fingerprint="x").namespace
    assert KVDescriptor.from_dict(descriptor.to_dict()) == descriptor
    assert KVDescriptor.from_proto(descriptor.to_proto()) == descriptor
    with pytest.raises(IncompatibleDescriptorError, match="unknown fields"):
        KVDescriptor.from_dict({**descriptor.to_dict(), "extra": 1})


def test_transfer_params_round_trip_keeps_64_bit_hashes(descriptor):
    params = KVTransferParams(connector="grpc", transfer_id="r1", num_tokens=9,
                              block_hashes=(2**64 - 1, 12345), descriptor=descriptor.to_dict(),
                              kv_server="127.0.0.1:5000")
    assert KVTransferParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match="kv_transfer_params lacks 'transfer_id'"):
        KVTransferParams.from_dict({"connector": "grpc"})


def test_transfer_params_as_protobuf(descriptor):
    params = KVTransferParams(connector="redis", transfer_id="r2", num_tokens=5, block_hashes=(2**63 + 5, 1),
                              descriptor=descriptor.to_dict(), engine_id="e")
    assert KVTransferParams.from_proto(params.to_proto()) == params
