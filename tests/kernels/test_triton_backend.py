"""The Triton attention backend against the torch backend on one mixed step (decodes first, then chunks)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.worker.torch_attention import TorchAttentionBackend
from pdserve.engine.worker.triton_attention import TritonAttentionBackend
from pdserve.kernels.reference import paged_attention_ref
from tests.helpers.attention_steps import step_metadata


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_matches_torch_backend(device, cache_dtype):
    torch.manual_seed(0)
    block_size, hq, hkv, d = 16, 4, 2, 32
    md = step_metadata(q_lens=[1, 1, 9, 6], ctx_lens=[20, 3, 0, 17], block_size=block_size, device=device)
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
