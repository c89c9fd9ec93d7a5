"""KV cache write: scatter this step's K/V rows into their cache slots (optionally quantising to FP8).

One program per token writes all of that token's KV heads: the rows of one token are contiguous in the
cache (``[block, offset, :, :]``), so each program issues a few wide stores. Tokens with a negative slot
(batch padding, e.g. in a CUDA-graph replay) are skipped inside the kernel, which keeps the launch grid
static.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_E4M3_MAX = 448.0


@triton.jit
def _round_to_e4m3(y):
    """Round float32 ``y`` (already within +-448) to the nearest e4m3 value, ties to even, still as float32.

    The GPU's own conversion rounds correctly, but Triton's interpreter drops the carry when rounding
    overflows the mantissa (31.9 -> 16 instead of 32); rounding here first makes the final cast exact on
    both, for a handful of integer ops in a memory-bound kernel.
    """
    a = tl.abs(y)
    # Below 2**-6 e4m3 is subnormal with a fixed spacing of 2**-9: shift into [2**-6, 2**-5), where three
    # mantissa bits give exactly that spacing, round there, and shift back.
    small = a < 0.015625
    a = tl.where(small, a + 0.015625, a)
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 of float32's 23 mantissa bits
    r = bits.to(tl.float32, bitcast=True)
    r = tl.where(small, r - 0.015625, r)
    return tl.where(y < 0, -r, r)


@triton.jit
def quantize_to_cache(x, inv_scale, cache_ptr, IS_FP8: tl.constexpr):
    """Cast ``x`` to the cache's element type; FP8 values are divided by the scale and saturated first."""
    if IS_FP8:
        y = tl.clamp(x.to(tl.float32) * inv_scale, -448.0, 448.0)
        return _round_to_e4m3(y).to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["inv_k_scale", "inv_v_scale"])
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, inv_k_scale, inv_v_scale,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, IS_FP8: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (heads < NUM_KV_HEADS)[:, None]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + heads[:, None] * stride_ch
    dst += offs_d[None, :]
    k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, quantize_to_cache(k, inv_k_scale, k_cache_ptr, IS_FP8), mask=mask)
    tl.store(v_cache_ptr + dst, quantize_to_cache(v, inv_v_scale, v_cache_ptr, IS_FP8), mask=mask)


def check_kv_inputs(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    k_scale: float, v_scale: float) -> None:
    """Shape/dtype/stride checks shared by the KV write and the fused rotary + write."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != tuple(k.shape[1:]):
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} is not [2, num_blocks, block_size, "
                         f"{k.shape[1]}, {k.shape[2]}]")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be [T] int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("k, v and kv_cache need a contiguous last dimension")
    block_size, head_dim = kv_cache.shape[2], k.shape[2]
    if block_size & (block_size - 1) or head_dim & (head_dim - 1):
        raise ValueError(f"block_size ({block_size}) and head_dim ({head_dim}) must be powers of two")
    if kv_cache.dtype != torch.float8_e4m3fn and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError("k_scale/v_scale apply to an fp8 cache only")
    if k_scale <= 0 or v_scale <= 0:
        raise ValueError("k_scale and v_scale must be positive")


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write ``k``/``v`` ``[T, Hkv, D]`` into ``kv_cache`` ``[2, num_blocks, block_size, Hkv, D]`` in place.

    ``slot_mapping[t]`` is the slot of token ``t`` (``block * block_size + offset``); negative means skip.
    For a ``float8_e4m3fn`` cache the stored value is ``clamp(x / scale, -448, 448)``.
    """
    check_kv_inputs(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, 1.0 / k_scale, 1.0 / v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=kv_cache.shape[2], IS_FP8=kv_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
    )
