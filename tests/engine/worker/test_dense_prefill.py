"""Fresh long prompts through cuDNN attention: when the path applies, its fallback, and (on a GPU) its output
against the paged kernel."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.worker.dense_prefill import DensePrefill, fresh_long_prompts
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
def test_matches_paged_kernel_on_gpu():
    """Two fresh prompts with Llama-3.1-8B's heads in bf16: the cuDNN path's output is the paged kernel's within
    bf16 rounding, and the cache is written the same way."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    md = step_metadata([2048, 2500], [0, 0], block_size=16, device=device)
    num_blocks = int(md.block_tables.max()) + 1
    qkv = torch.randn(md.num_tokens, (32 + 16) * 128, device=device, dtype=torch.bfloat16)
    q, k, v = (t.view(md.num_tokens, -1, 128) for t in qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1))
    cache = torch.zeros(2, num_blocks, 16, 8, 128, device=device, dtype=torch.bfloat16)
    cache_paged = cache.clone()
    dense, paged = TritonAttentionBackend(), TritonAttentionBackend()
    dense.dense_prefill.min_tokens, paged.dense_prefill.min_tokens = 2048, None
    assert dense.dense_prefill.applies(q, cache, md)
    out = dense.forward(q, k, v, cache, md)
    assert not dense.dense_prefill._unavailable, "cuDNN attention did not run"
    want = paged.forward(q, k, v, cache_paged, md)
    assert torch.equal(cache, cache_paged)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
