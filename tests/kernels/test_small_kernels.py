"""KV cache write, rotary embedding (alone and fused with the write) and RMSNorm against their references."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.ops import (fused_add_rms_norm, rms_norm, rotary_embedding, rotary_embedding_and_write_kv,
                             write_kv_cache)
from pdserve.kernels import reference as ref

FP8 = torch.float8_e4m3fn
CACHE_DTYPES = [(torch.float16, 1.0), (FP8, 0.05)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _kv(num_tokens: int, num_kv_heads: int, head_dim: int, device, dtype=torch.float32):
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=device, dtype=dtype)
    return k, torch.randn_like(k)


@pytest.mark.parametrize("cache_dtype,scale", CACHE_DTYPES + [(torch.float32, 1.0)])
def test_write_kv_cache(device, cache_dtype, scale):
    k, v = _kv(7, 3, 32, device)
    slots = torch.tensor([0, 5, -1, 17, 33, -1, 63], device=device)
    got = torch.zeros(2, 4, 16, 3, 32, device=device, dtype=cache_dtype)
    want = got.clone()
    write_kv_cache(k, v, got, slots, scale, scale)
    ref.write_kv_cache_ref(k, v, want, slots, scale, scale)
    assert torch.equal(_bits(got), _bits(want))


def test_fp8_rounding_matches_torch_everywhere(device):
    # Every e4m3 value, every midpoint between neighbours (ties to even), subnormals and saturation.
    finite = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    finite = finite[finite.isfinite()].unique()
    x = torch.cat([finite, (finite[1:] + finite[:-1]) / 2, torch.randn(512) * 100, torch.tensor([500.0, -1e4])])
    x = torch.cat([x, torch.zeros((-x.numel()) % 32)]).to(device)
    k = x.view(-1, 1, 32)
    cache = torch.zeros(2, k.shape[0], 1, 1, 32, dtype=FP8, device=device)
    write_kv_cache(k, k, cache, torch.arange(k.shape[0], device=device), 1.0, 1.0)
    assert torch.equal(cache[0].flatten().float(), x.clamp(-448, 448).to(FP8).float())


def test_write_kv_cache_rejects_bad_inputs(device):
    k, v = _kv(2, 2, 16, device)
    cache = torch.zeros(2, 2, 16, 2, 16, device=device)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, v, cache, torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv_cache(k, v, cache[:, :, :, :1], torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="fp8"):
        write_kv_cache(k, v, cache, torch.zeros(2, dtype=torch.int64, device=device), k_scale=0.5)


@pytest.mark.parametrize("rot_dim,with_k", [(32, True), (16, False)])
def test_rotary(device, rot_dim, with_k):
    cos_sin = ref.cos_sin_cache(rot_dim, 64, device=device)
    positions = torch.randint(0, 64, (5,), device=device)
    q = torch.randn(5, 6, 32, device=device, dtype=torch.float16)
    k = torch.randn(5, 2, 32, device=device, dtype=torch.float16) if with_k else None
    q_want = ref.rotary_ref(positions, q, cos_sin)
    k_want = ref.rotary_ref(positions, k, cos_sin) if with_k else None
    rotary_embedding(positions, q, k, cos_sin)
    torch.testing.assert_close(q, q_want, atol=1e-3, rtol=1e-3)
    if with_k:
        torch.testing.assert_close(k, k_want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("cache_dtype,scale", CACHE_DTYPES)
@pytest.mark.parametrize("rot_dim", [32, 16])
def test_rotary_fused_with_cache_write(device, cache_dtype, scale, rot_dim):
    cos_sin = ref.cos_sin_cache(rot_dim, 64, device=device)
    positions = torch.randint(0, 64, (6,), device=device, dtype=torch.int32)
    q = torch.randn(6, 4, 32, device=device)
    k, v = _kv(6, 2, 32, device)
    slots = torch.tensor([3, -1, 10, 31, 0, 17], device=device)
    q_want, k_want = ref.rotary_ref(positions, q, cos_sin), ref.rotary_ref(positions, k, cos_sin)
    want = torch.zeros(2, 2, 16, 2, 32, device=device, dtype=cache_dtype)
    got = want.clone()
    ref.write_kv_cache_ref(k_want, v, want, slots, scale, scale)
    rotary_embedding_and_write_kv(positions, q, k, v, cos_sin, got, slots, scale, scale)
    torch.testing.assert_close(q, q_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_want, atol=1e-5, rtol=1e-5)
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_add_rms_norm(device, dtype):
    x = torch.randn(5, 48, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(48, device=device, dtype=dtype)
    normed_want, residual_want = ref.rms_norm_ref(x, weight, 1e-6, residual)
    normed = fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, residual_want, atol=0, rtol=0)
    torch.testing.assert_close(normed, normed_want, atol=2e-3, rtol=2e-3)


def test_rms_norm_per_head_view(device):
    # Qwen3 normalises q per head: [T, H, D] with a strided token dim (a slice of the fused qkv output).
    qkv = torch.randn(4, 10, 16, device=device)
    q = qkv[:, :6]
    weight = torch.randn(16, device=device)
    torch.testing.assert_close(rms_norm(q, weight, 1e-5), ref.rms_norm_ref(q, weight, 1e-5)[0])


# --------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype,scale", [(torch.bfloat16, 1.0), (FP8, 0.02)])
def test_gpu_write_and_rotary(cache_dtype, scale):
    t, hq, hkv, d, bs = 300, 32, 8, 128, 16
    cos_sin = ref.cos_sin_cache(d, 8192, base=500000.0, device="cuda")
    positions = torch.randint(0, 8192, (t,), device="cuda")
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = _kv(t, hkv, d, "cuda", torch.bfloat16)
    slots = torch.randperm(64 * bs, device="cuda")[:t]
    slots[::7] = -1
    q_want, k_want = ref.rotary_ref(positions, q, cos_sin), ref.rotary_ref(positions, k, cos_sin)
    want = torch.zeros(2, 64, bs, hkv, d, device="cuda", dtype=cache_dtype)
    got, got_fused = want.clone(), want.clone()
    ref.write_kv_cache_ref(k_want, v, want, slots, scale, scale)
    q1, k1 = q.clone(), k.clone()
    rotary_embedding(positions, q1, k1, cos_sin)
    write_kv_cache(k1, v, got, slots, scale, scale)
    rotary_embedding_and_write_kv(positions, q, k, v, cos_sin, got_fused, slots, scale, scale)
    for qq, kk in ((q1, k1), (q, k)):
        torch.testing.assert_close(qq, q_want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(kk, k_want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0.13)
    assert torch.equal(_bits(got), _bits(got_fused))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [896, 4096])
def test_gpu_fused_add_rms_norm(hidden):
    x = torch.randn(257, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    normed_want, residual_want = ref.rms_norm_ref(x, weight, 1e-6, residual)
    normed = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual, residual_want)
    torch.testing.assert_close(normed, normed_want, atol=2e-2, rtol=2e-2)
