"""Neox-style rotary embedding, alone or fused with the KV cache write.

The cos/sin table is ``[max_position, rot_dim]`` (cos in the first half, sin in the second; see
``reference.cos_sin_cache``), indexed by each token's position, so any RoPE scaling variant is just a different
table. Dims past ``rot_dim`` pass through (partial rotary).

Why the fused variant pays: without it a decode step reads K once to rotate it, writes it back, then reads
it again to scatter it into the cache. Fused, K and V are each read once and stored once into the cache
(K is also stored back rotated, for callers that still need it), and the launch count drops from two to one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_cache import check_kv_inputs, quantize_to_cache


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, cos, sin,
                  NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate ``x[token, :NUM_HEADS, :2*HALF]`` in place; returns the rotated halves (float32)."""
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads < NUM_HEADS)[:, None] & (offs < HALF)[None, :]
    ptrs = x_ptr + token.to(tl.int64) * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptrs, y1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, y2.to(x_ptr.dtype.element_ty), mask=mask)
    return y1, y2


@triton.jit(do_not_specialize=["inv_k_scale", "inv_v_scale"])
def _rotary_kernel(pos_ptr, cos_sin_ptr, q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                   inv_k_scale, inv_v_scale, stride_cos, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                   NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                   HAS_K: tl.constexpr, WRITE_CACHE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   IS_FP8: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cos + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cos + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, BLOCK_HQ, HALF, BLOCK_HALF)
    if HAS_K:
        k1, k2 = _rotate_heads(k_ptr, token, stride_kt, stride_kh, cos, sin,
                               NUM_KV_HEADS, BLOCK_HKV, HALF, BLOCK_HALF)
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + token).to(tl.int64)
            if slot >= 0:
                heads = tl.arange(0, BLOCK_HKV)
                h_ok = (heads < NUM_KV_HEADS)[:, None]
                row = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + heads[:, None] * stride_ch
                rot_ok = h_ok & (offs < HALF)[None, :]
                k_dst = k_cache_ptr + row + offs[None, :]
                # Through k's own dtype first: the cache then holds exactly what an unfused rotate + write
                # would store.
                k1_out = k1.to(k_ptr.dtype.element_ty)
                k2_out = k2.to(k_ptr.dtype.element_ty)
                tl.store(k_dst, quantize_to_cache(k1_out, inv_k_scale, k_cache_ptr, IS_FP8), mask=rot_ok)
                tl.store(k_dst + HALF, quantize_to_cache(k2_out, inv_k_scale, k_cache_ptr, IS_FP8), mask=rot_ok)
                # V whole, and the dims of K that rotary leaves alone (none unless rot_dim < head_dim).
                offs_d = tl.arange(0, HEAD_DIM)
                v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + offs_d[None, :],
                            mask=h_ok)
                tl.store(v_cache_ptr + row + offs_d[None, :], quantize_to_cache(v, inv_v_scale, v_cache_ptr, IS_FP8),
                         mask=h_ok)
                if 2 * HALF < HEAD_DIM:
                    pass_ok = h_ok & (offs_d >= 2 * HALF)[None, :]
                    k_src = k_ptr + token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + offs_d[None, :]
                    k_rest = tl.load(k_src, mask=pass_ok)
                    tl.store(k_cache_ptr + row + offs_d[None, :],
                             quantize_to_cache(k_rest, inv_k_scale, k_cache_ptr, IS_FP8), mask=pass_ok)


def _check_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None, cos_sin: torch.Tensor) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [T, Hq, D] with a contiguous last dim, got {tuple(q.shape)}")
    if k is not None and (k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.stride(2) != 1):
        raise ValueError(f"k must be [T, Hkv, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [T] int32/int64, got {tuple(positions.shape)} {positions.dtype}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] % 2 or cos_sin.shape[1] > q.shape[2] or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be [max_position, rot_dim <= {q.shape[2]}] with even rot_dim, "
                         f"got {tuple(cos_sin.shape)}")


def _launch(positions, q, k, v, cos_sin, kv_cache, slot_mapping, k_scale, v_scale) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half = cos_sin.shape[1] // 2
    write = kv_cache is not None
    k_arg = k if k is not None else q
    v_arg = v if write else q
    k_cache = kv_cache[0] if write else q
    v_cache = kv_cache[1] if write else q
    cstrides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)) if write else (0, 0, 0)
    num_kv_heads = k_arg.shape[1]
    _rotary_kernel[(num_tokens,)](
        positions, cos_sin, q, k_arg, v_arg, k_cache, v_cache, slot_mapping if write else positions,
        1.0 / k_scale, 1.0 / v_scale, cos_sin.stride(0), q.stride(0), q.stride(1), k_arg.stride(0), k_arg.stride(1),
        v_arg.stride(0), v_arg.stride(1), *cstrides,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads), HAS_K=k is not None, WRITE_CACHE=write,
        BLOCK_SIZE=kv_cache.shape[2] if write else 1,
        IS_FP8=write and kv_cache.dtype == torch.float8_e4m3fn, num_warps=4,
    )


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
                     cos_sin_cache: torch.Tensor) -> None:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]`` (optional) in place, neox style.

    ``positions`` ``[T]`` index ``cos_sin_cache`` ``[max_position, rot_dim]`` (cos half, then sin half).
    """
    _check_rotary(positions, q, k, cos_sin_cache)
    _launch(positions, q, k, None, cos_sin_cache, None, None, 1.0, 1.0)


def rotary_embedding_and_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                  k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Rotate ``q`` and ``k`` in place and write rotated ``k`` and ``v`` into ``kv_cache`` in one launch.

    Same result as :func:`rotary_embedding` followed by :func:`pdserve.kernels.write_kv_cache`.
    """
    _check_rotary(positions, q, k, cos_sin_cache)
    check_kv_inputs(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    _launch(positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping, k_scale, v_scale)
