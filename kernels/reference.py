"""Pure-torch references for every Triton kernel in :mod:`pdserve.kernels`.

Each function computes the same result as its kernel, written for clarity rather than speed: loops over
sequences, float32 math, no fusion. The kernel tests compare against these, and they double as a precise
statement of each kernel's contract. Nothing here imports Triton.

KV cache layout (shared with the engine): one tensor per layer ``[2, num_blocks, block_size, num_kv_heads,
head_dim]``, index 0 holding K and 1 holding V; token slot ``s`` lives at ``[:, s // block_size, s % block_size]``.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


def quantize_fp8(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to the e4m3 range and cast to ``torch.float8_e4m3fn``."""
    y = x.float() / (scale.float() if isinstance(scale, torch.Tensor) else scale)
    return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Float32 view of a cache tensor: fp8 values times ``scale``, other dtypes as they are."""
    if x.dtype == torch.float8_e4m3fn:
        return x.float() * (scale.float() if isinstance(scale, torch.Tensor) else scale)
    return x.float()


def write_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter ``k``/``v`` ``[T, Hkv, D]`` into ``kv_cache`` at ``slot_mapping`` ``[T]``; negative slots are skipped."""
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    if kv_cache.dtype == torch.float8_e4m3fn:
        kq, vq = quantize_fp8(k[keep], k_scale), quantize_fp8(v[keep], v_scale)
    else:
        kq, vq = k[keep].to(kv_cache.dtype), v[keep].to(kv_cache.dtype)
    kv_cache[0, blocks, offsets] = kq
    kv_cache[1, blocks, offsets] = vq


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sm_scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of varlen queries ``q [T, Hq, D]`` over the paged cache; returns ``[T, Hq, D]``.

    Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``; they sit at the last ``q_len``
    positions of its ``seq_lens[b]`` context, whose K/V are read through ``block_tables[b]``. Rows past
    ``query_start_loc[-1]`` (batch padding) are left zero.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b in range(len(lens)):
        start, end, ctx = qsl[b], qsl[b + 1], lens[b]
        q_len = end - start
        if q_len == 0:
            continue
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        flat = kv_cache.flatten(1, 2)  # [2, num_slots, Hkv, D]
        k = dequantize(flat[0, slots], k_scale).repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = dequantize(flat[1, slots], v_scale).repeat_interleave(group, dim=1)
        qb = q[start:end].float()  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * sm_scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        causal = pos[None, :] <= q_pos[:, None]  # [q_len, ctx]
        scores = scores.masked_fill(~causal[None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)


def cos_sin_cache(rot_dim: int, max_position: int, base: float = 10000.0, inv_freq: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``[max_position, rot_dim]`` table the rotary kernels read: cos in the first half, sin in the second.

    ``inv_freq`` (``[rot_dim // 2]``) lets a model pass scaled frequencies (Llama 3, YaRN); by default it is the
    plain ``base ** (-2i / rot_dim)``.
    """
    if inv_freq is None:
        inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64, device=device) / rot_dim)
    t = torch.arange(max_position, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq.to(device=device, dtype=torch.float64))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def rotary_ref(positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding of ``x [T, H, D]``: the first ``rot_dim`` dims are split in two halves that
    rotate as pairs ``(i, i + rot_dim/2)``; the rest pass through. Returns a new tensor."""
    rot_dim = cos_sin.shape[1]
    half = rot_dim // 2
    cs = cos_sin[positions.long()].float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:rot_dim]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., rot_dim:]], dim=-1)
    return rotated.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rmsnorm(x + residual) * weight, x + residual)``; without ``residual``: ``(rmsnorm(x) * weight, None)``.

    Rounding follows transformers: the sum is rounded to ``x``'s dtype, normalised in float32, rounded again,
    then multiplied by the weight.
    """
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype), (None if residual is None else h)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` ``[..., 2I]``, rounded as torch rounds it in ``x``'s dtype:
    the float32 SiLU is rounded to the dtype before the float32 multiply, which is rounded again."""
    gate, up = x.float().chunk(2, dim=-1)
    act = (gate / (1.0 + torch.exp(-gate))).to(x.dtype)
    return (act.float() * up).to(x.dtype)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x [M, K]``, ``weight [N, K]``: float32 accumulation, one rounding to
    ``x``'s dtype at the end."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
