"""Fresh long prompts through cuDNN attention: when the path applies, its fallback, and (on a GPU) its output
against the paged kernel."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from pdserve.engine.worker.dense_prefill import DensePrefill, bucket_len, buckets, fresh_long_prompts
from pdserve.engine.worker.triton_attention import TritonAttentionBackend
from tests.helpers.attention_steps import step_metadata


@pytest.mark.parametrize(("q_lens", "ctx_lens", "want"), [
    ([4096], [0], True),
    ([2048, 3000], [0, 0], True),
    ([2047], [0], False),  # too short
    ([4096, 4096], [0, 16], False),  # the second continues a cached prefix: it needs the paged kernel
    ([4096, 1], [0, 40], False),  # a decode rides along
])
def test_fresh_long_prompts(q_lens, ctx_lens, want):
    md = step_metadata(q_lens, ctx_lens, block_size=16, device=torch.device("cpu"))
    assert fresh_long_prompts(md, 2048) is want


def test_setting_from_environment(monkeypatch):
    monkeypatch.delenv("PDSERVE_DENSE_PREFILL", raising=False)
    assert DensePrefill.from_env().min_tokens is None  # off by default (the module docstring says why)
    monkeypatch.setenv("PDSERVE_DENSE_PREFILL", "0")
    assert DensePrefill.from_env().min_tokens is None
    monkeypatch.setenv("PDSERVE_DENSE_PREFILL", "8192")
    assert DensePrefill.from_env().min_tokens == 8192
    monkeypatch.setenv("PDSERVE_DENSE_PREFILL", "yes")
    with pytest.raises(ValueError, match="PDSERVE_DENSE_PREFILL"):
        DensePrefill.from_env()


@pytest.mark.parametrize(("length", "padded"), [
    (1, 256), (256, 256), (257, 512), (2048, 2048), (2049, 2304), (4096, 4096), (4097, 4608), (30000, 30720),
    (32768, 32768), (32769, 36864),
])
def test_bucket_len(length, padded):
    assert bucket_len(length) == padded


def test_buckets_cover_every_length_between_the_bounds():
    assert buckets(2048, 8192) == list(range(2048, 4097, 256)) + list(range(4608, 8193, 512))
    assert buckets(2048, 5000) == list(range(2048, 4097, 256)) + [4608, 5120]
    assert buckets(3000, 3000) == [3072]
    assert buckets(9000, 8192) == []
    for length in range(2048, 8193, 97):
        assert bucket_len(length) in buckets(2048, 8192)


@pytest.mark.parametrize("packed", [True, False])
def test_padded_prompt_attends_exactly_as_the_unpadded_one(packed):
    """A 300-token prompt runs at its bucket (512) with zero rows after it: the causal mask keeps them from every
    real row, so the first 300 output rows are the unpadded attention's (torch's math SDPA on the CPU, float32)."""
    torch.manual_seed(0)
    length, hq, hkv, dim = 300, 4, 2, 32
    if packed:  # the projection's layout: q, k, v are column slices of one [L, Hq + 2 Hkv, D] tensor
        qkv = torch.randn(length, hq + 2 * hkv, dim)
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    else:
        q, k, v = torch.randn(length, hq, dim), torch.randn(length, hkv, dim), torch.randn(length, hkv, dim)
    got = DensePrefill(min_tokens=16)._one_prompt(q, k, v, scale=0.2)
    want = F.scaled_dot_product_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                          scale=0.2, enable_gqa=True)[0].transpose(0, 1)
    assert got.shape == (length, hq, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_never_applies_off_gpu_and_falls_back_without_cudnn():
    md = step_metadata([64], [0], block_size=16, device=torch.device("cpu"))
    q, k = torch.randn(64, 4, 32, dtype=torch.bfloat16), torch.randn(64, 2, 32, dtype=torch.bfloat16)
    cache = torch.zeros(2, 4, 16, 2, 32, dtype=torch.bfloat16)
    dense = DensePrefill(min_tokens=16)
    assert not dense.applies(q, cache, md)  # a CPU tensor
    # Asked anyway, cuDNN attention refuses CPU tensors: no answer, and the object stops trying.
    assert dense.attend(q, k, k, md, None) is None
    assert dense._unavailable


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("q_lens", [[2048, 2500], [2100], [2304]])
def test_matches_paged_kernel_on_gpu(q_lens):
    """Fresh prompts with Llama-3.1-8B's heads in bf16 (two of them; one padded to its bucket; one exactly a
    bucket, used in place): the cuDNN path's output is the paged kernel's within bf16 rounding, the cache is
    written the same way, and the first call built every bucket's graph up to the limit."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    md = step_metadata(q_lens, [0] * len(q_lens), block_size=16, device=device)
    num_blocks = int(md.block_tables.max()) + 1
    qkv = torch.randn(md.num_tokens, (32 + 16) * 128, device=device, dtype=torch.bfloat16)
    q, k, v = (t.view(md.num_tokens, -1, 128) for t in qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1))
    cache = torch.zeros(2, num_blocks, 16, 8, 128, device=device, dtype=torch.bfloat16)
    cache_paged = cache.clone()
    dense, paged = TritonAttentionBackend(), TritonAttentionBackend()
    dense.dense_prefill.min_tokens, paged.dense_prefill.min_tokens = 2048, None
    dense.dense_prefill.limit(3000)
    assert dense.dense_prefill.applies(q, cache, md)
    out = dense.forward(q, k, v, cache, md)
    assert not dense.dense_prefill._unavailable, "cuDNN attention did not run"
    assert len(dense.dense_prefill._built) == 1
    want = paged.forward(q, k, v, cache_paged, md)
    assert torch.equal(cache, cache_paged)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    too_long = step_metadata([3100], [0], block_size=16, device=device)
    assert not dense.dense_prefill.applies(q, cache, too_long)  # over the limit: no graph built for it
