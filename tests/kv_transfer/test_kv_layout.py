"""Cache <-> payload copies for every transferable dtype (fp8 included), and the gRPC stream in small chunks."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch

from kv_harness import admit, make_request, make_side, prefill, same_kv, wait_for

from pdserve.engine.kv_transfer import kv_layout
from pdserve.engine.kv_transfer.block_format import decode_block, encode_block


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float8_e4m3fn"])
def test_gather_encode_decode_write_round_trip(dtype, descriptor):
    desc = dataclasses.replace(descriptor, dtype=dtype)
    shape = (2, 6, desc.block_size, desc.num_kv_heads, desc.head_dim)
    src = [torch.randn(shape).to(getattr(torch, dtype)) for _ in range(desc.num_layers)]
    dst = [torch.zeros(shape).to(getattr(torch, dtype)) for _ in range(desc.num_layers)]
    assert kv_layout.descriptor_for(src, model_fingerprint="test-model", hash_algo="sha256", hash_seed_id=0) == desc
    stage = kv_layout.gather_blocks(src, [4, 1])
    for row, (block, n) in enumerate([(4, 4), (1, 3)]):
        blob = encode_block(desc, 9, n, kv_layout.payload_from_stage(stage, row, n))
        header, payload = decode_block(blob, desc)
        kv_layout.write_block(dst, 5 - row, kv_layout.payload_array(payload, desc, n))
        for a, b in zip(src, dst):
            assert torch.equal(a[:, block, :n].view(torch.uint8), b[:, 5 - row, :n].view(torch.uint8))


def test_grpc_stream_in_chunks_smaller_than_a_block(descriptor, tmp_path):
    desc = dataclasses.replace(descriptor, model_fingerprint=uuid.uuid4().hex)
    opts = {"kv_chunk_bytes": 100, "kv_load_timeout_s": 5}
    p, d = make_side("grpc", "prefill", desc, opts), make_side("grpc", "decode", desc, opts, fill="zeros")
    try:
        _, params = prefill(p, make_request("r1", list(range(10))), [0, 1, 2])
        assert admit(d, make_request("r1", list(range(10)), [5], params), [3, 4, 5]) == 10
        wait_for(d, lambda: "r1" in d.output.finished_loading)
        assert same_kv(p, [0, 1, 2], d, [3, 4, 5], 10, desc.block_size)
        assert desc.payload_bytes() > 5 * 100  # several chunks per block
    finally:
        p.close()
        d.close()
