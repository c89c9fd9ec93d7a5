"""The Triton attention backend against the torch backend on one mixed step (decodes first, then chunks)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.worker.attention import AttentionMetadata
from pdserve.engine.worker.torch_attention import TorchAttentionBackend
from pdserve.engine.worker.triton_attention import TritonAttentionBackend
from pdserve.kernels.reference import paged_attention_ref


def _metadata(q_lens: list[int], ctx_lens: list[int], block_size: int, device) -> AttentionMetadata:
    """Blocks handed out in order; new tokens' slots follow from the block tables."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    tables, slots, next_block = [], [], 0
    for q_len, ctx, n in zip(q_lens, ctx_lens, per_seq):
        table = list(range(next_block, next_block + n))
        next_block += n
        tables.append(table + [0] * (max(per_seq) - n))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + q_len)]
    qsl = [0]
    for q_len in q_lens:
        qsl.append(qsl[-1] + q_len)
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        num_tokens=qsl[-1], query_start_loc=torch.tensor(qsl, **i32), seq_lens=torch.tensor(seq_lens, **i32),
        context_lens=torch.tensor(ctx_lens, **i32), block_tables=torch.tensor(tables, **i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device), max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), num_decodes=sum(1 for q in q_lens if q == 1),
        logits_indices=torch.tensor(qsl[1:], device=device) - 1, query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens, context_lens_cpu=ctx_lens,
    )


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_matches_torch_backend(device, cache_dtype):
    torch.manual_seed(0)
    block_size, hq, hkv, d = 16, 4, 2, 32
    md = _metadata(q_lens=[1, 1, 9, 6], ctx_lens=[20, 3, 0, 17], block_size=block_size, device=device)
    num_blocks = int(md.block_tables.max()) + 1
    q = torch.randn(md.num_tokens, hq, d, device=device)
    k, v = torch.randn(md.num_tokens, hkv, d, device=device), torch.randn(md.num_tokens, hkv, d, device=device)
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device=device).to(cache_dtype)
    cache_torch = cache.clone()
    out = TritonAttentionBackend().forward(q, k, v, cache, md)
    want = TorchAttentionBackend().forward(q, k, v, cache_torch, md)
    tol = dict(atol=2e-3 if device.type == "cuda" else 1e-5, rtol=1e-3)
    if cache_dtype != torch.float8_e4m3fn:
        assert torch.equal(cache, cache_torch)
        torch.testing.assert_close(out, want, **tol)
        return
    assert torch.equal(cache.view(torch.uint8), cache_torch.view(torch.uint8))
    # The torch backend attends a fresh prefill over its unquantised K/V, the Triton one over the cache (what
    # later decode steps see): equal to the reference over the cache, and within fp8 rounding of torch.
    exact = paged_attention_ref(q, cache, md.query_start_loc, md.seq_lens, md.block_tables, d ** -0.5)
    torch.testing.assert_close(out, exact, atol=2e-3, rtol=2e-3)  # the kernel rounds q to float16 for fp8
    assert ((out - want).norm() / want.norm()).item() < 0.1
