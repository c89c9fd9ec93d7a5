"""Block hashes are 128 bits end to end (issue 11): the hash module, KV events, the transfer handle (JSON and
protobuf), block headers and store keys all keep every bit."""

from __future__ import annotations

import msgspec

from pdserve.engine.core.block_hash import HASH_VERSION, BlockHasher, hash_from_bytes, hash_to_bytes
from pdserve.engine.core.kv_events import BlockRemoved, BlockStored
from pdserve.engine.kv_event_publisher import WIRE_VERSION, EventBatch, batch_decoder, from_wire, to_wire
from pdserve.engine.kv_transfer.base import KVTransferParams
from pdserve.engine.kv_transfer.block_format import decode_block, encode_block
from pdserve.engine.kv_transfer.stores.store import block_key

BIG = (1 << 128) - 12345  # needs all 128 bits


def test_hashes_use_128_bits():
    hashes = BlockHasher(4, seed=7).hash_prefix(list(range(400)))
    assert HASH_VERSION == 2
    assert all(0 <= h < 1 << 128 for h in hashes)
    assert max(hashes) >= 1 << 64  # 100 hashes below 2^64 would mean 64-bit hashes (odds 2^-6400)
    assert hash_from_bytes(hash_to_bytes(BIG)) == BIG and len(hash_to_bytes(BIG)) == 16


def test_kv_events_carry_128_bit_hashes():
    batch = EventBatch(WIRE_VERSION, "e", 0, 0.0, [to_wire(BlockStored((BIG, 3), BIG - 1, (1, 2), 1)),
                                                   to_wire(BlockRemoved((BIG,)))])
    decoded = batch_decoder().decode(msgspec.msgpack.encode(batch))
    assert [from_wire(e) for e in decoded.events] == [BlockStored((BIG, 3), BIG - 1, (1, 2), 1),
                                                       BlockRemoved((BIG,))]


def test_handles_headers_and_store_keys_keep_every_bit(descriptor):
    params = KVTransferParams(connector="grpc", transfer_id="t", num_tokens=5, block_hashes=(BIG, 1),
                              descriptor=descriptor.to_dict())
    assert params.to_dict()["block_hashes"][0] == f"{BIG:032x}"
    assert KVTransferParams.from_dict(params.to_dict()) == params
    assert KVTransferParams.from_proto(params.to_proto()) == params
    payload = bytes(descriptor.payload_bytes())
    header, _ = decode_block(encode_block(descriptor, BIG, descriptor.block_size, payload), descriptor, BIG)
    assert header.block_hash == BIG
    assert block_key(BIG) == f"{BIG:032x}" and block_key(BIG) != block_key(BIG & ((1 << 64) - 1))
