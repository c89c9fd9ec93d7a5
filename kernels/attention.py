"""Paged attention: one Triton kernel for prefill, chunked prefill and decode.

Layout of the work (why it is shaped this way):

* **GQA packing.** A program owns one KV head and a tile of ``BLOCK_M`` rows, where row ``r`` is query token
  ``r // G`` of the tile and query head ``r % G`` of that KV head's group (``G = Hq // Hkv``). Every K/V tile it
  loads therefore serves all ``G`` query heads at once: decode reads each KV byte once, not ``G`` times, and
  a decode step (one token, ``G`` heads) still fills the ``M >= 16`` rows a tensor-core dot needs.
* **Static grid.** The grid is ``(T // BLOCK_Q + B, Hkv, num_splits)``, fixed by tensor shapes alone, so the
  launch can be captured in a CUDA graph and replayed with new metadata. Sequence ``b`` owns the programs
  ``[qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1)`` -- a range at least as long as its number of
  query tiles -- and each program finds its sequence by a binary search over ``query_start_loc``.
  Programs with nothing to do return at once.
* **Causal varlen over a cached prefix.** Queries of sequence ``b`` sit at positions ``seq_len - q_len ..
  seq_len - 1``; a row attends to keys ``<= its position``. KV tiles wholly below the tile's first query
  position run without masks; only the diagonal tiles pay for them.
* **Split-KV (flash-decoding).** With few (sequence, KV head) pairs the GPU would idle, so the KV range is
  cut into ``num_splits`` pieces, each program writes a normalised partial output and its log-sum-exp,
  and a second kernel combines them.
* **FP8 cache.** K/V stored as ``float8_e4m3fn`` are widened to float16 in registers (one conversion
  instruction per pair); ``q`` is scaled by the softmax and K scales and rounded to float16 once per program,
  and the V scale multiplies the final output, so dequantisation adds no per-key multiply.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.smem import SLACK_BYTES, pipelined_kv_tiles, shared_memory_limit

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters of one paged-attention launch."""

    block_m: int  # rows of the query tile: query tokens x heads of one KV group
    block_n: int  # keys per inner-loop tile (any power of two; it may span several cache blocks)
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, tile_lo, tile_hi, q_pos, kv_end,
                  stride_cb, stride_cs, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  MASKED: tl.constexpr, KV_FP8: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over KV tiles [tile_lo, tile_hi); scores in log2 units.

    With an FP8 cache ``q`` arrives pre-scaled and in float16, the type e4m3 widens to in one instruction.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            in_ctx = offs_n < kv_end
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=in_ctx, other=0)
        else:
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE)
        # int64: block * stride overflows int32 on caches of more than 2**31 elements.
        kv_off = blk.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs
        kv_ptrs = kv_off[:, None] + offs_d[None, :]
        if MASKED:
            # Masked so that never-written cache slots (NaN bit patterns, fp8 0x7f) cannot reach 0 * NaN.
            k = tl.load(k_base + kv_ptrs, mask=in_ctx[:, None], other=0.0)
            v = tl.load(v_base + kv_ptrs, mask=in_ctx[:, None], other=0.0)
        else:
            k = tl.load(k_base + kv_ptrs)
            v = tl.load(v_base + kv_ptrs)
        if KV_FP8:
            s = tl.dot(q, tl.trans(k.to(tl.float16)))
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & in_ctx[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, ws_out_ptr, ws_lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, num_splits, qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_KV: tl.constexpr,
    KV_FP8: tl.constexpr, QUERY_KIND: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if QUERY_KIND == 1:
        # One-token sequences only: program b is sequence b.
        seq = tl.program_id(0)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        if q_len != 1:
            return
        q_tile = 0
    else:
        # Highest query tiles first: under a causal mask they have the most keys, and starting the longest work
        # first shortens the tail of the launch.
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
        # Find the sequence whose program range holds pid: the last b with qsl[b] // BLOCK_Q + b <= pid.
        lo = tl.full([], 0, tl.int32)
        hi = lo + num_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            lo = tl.where(first <= pid, mid, lo)
            hi = tl.where(first <= pid, hi, mid - 1)
        seq = lo
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_tile = pid - (q_start // BLOCK_Q + seq)
        if q_tile * BLOCK_Q >= q_len:
            return
        if QUERY_KIND == 2 and q_len == 1:  # the one-token sequences have a launch of their own
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + (q_start + q_idx)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if KV_FP8:
        # Scaling first keeps float16 clear of overflow (|q| would need to exceed ~1e5 x the scale).
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
    q_pos = prefix + q_idx

    # This tile's keys: [0, kv_end); those below its first query position need no causal mask.
    kv_end = prefix + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    tile_lo = tl.minimum(split * per_split, n_tiles)
    tile_hi = tl.minimum(tile_lo + per_split, n_tiles)
    n_full = tl.minimum(kv_end, prefix + q_tile * BLOCK_Q + 1) // BLOCK_N
    tile_mid = tl.maximum(tile_lo, tl.minimum(tile_hi, n_full))

    k_base = k_ptr + kv_head * stride_ch
    v_base = v_ptr + kv_head * stride_ch
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # A finite floor instead of -inf keeps exp2(m_old - m_new) NaN-free for rows that see no key in a split.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, tile_lo, tile_mid, q_pos, kv_end,
                                  stride_cb, stride_cs, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_SIZE, False, KV_FP8)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, tile_mid, tile_hi, q_pos, kv_end,
                                  stride_cb, stride_cs, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_SIZE, True, KV_FP8)

    has_keys = l_i > 0.0
    out = acc * (v_scale / tl.where(has_keys, l_i, 1.0))[:, None]
    token = (q_start + q_idx).to(tl.int64)
    if not SPLIT_KV:
        o_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Workspace [T, Hq, num_splits, (D)], float32; an empty split records lse = -inf and weighs nothing.
        row = (token * (GROUP * tl.num_programs(1)) + head) * num_splits + split
        tl.store(ws_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(ws_lse_ptr + row, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(ws_out_ptr, ws_lse_ptr, out_ptr, num_heads, num_splits, stride_ot, stride_oh,
                           HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    row0 = (token.to(tl.int64) * num_heads + head) * num_splits
    s_ok = offs_s < num_splits
    lse = tl.load(ws_lse_ptr + row0 + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    parts = tl.load(ws_out_ptr + (row0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=(w > 0.0)[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(group: int, head_dim: int, max_query_len: int, device: torch.device,
                   kv_fp8: bool = False, num_seqs: int = 1, num_kv_heads: int = 1,
                   dtype: torch.dtype = torch.bfloat16) -> AttentionConfig:
    """Tile shape for a launch: small query tiles for decode-like batches, large ones for prefill; shrunk to
    the device's shared memory for ``dtype`` (the queries' and the cache's element type; see
    :func:`fit_shared_memory`).

    Picked from sweeps on an H200 (``pdserve bench kernels --sweep``).
    """
    if device.type != "cuda":  # the interpreter: small tiles keep numpy fast
        return AttentionConfig(block_m=max(16, triton.next_power_of_2(group)), block_n=16)
    many = 2 * num_seqs * num_kv_heads >= _num_sms(device.index or 0)
    cfg = tuned_config(group, head_dim, max_query_len, kv_fp8, many)
    elem = torch.empty((), dtype=dtype).element_size()
    return fit_shared_memory(cfg, head_dim, 2 if kv_fp8 else elem, 1 if kv_fp8 else elem,
                             shared_memory_limit(device), max(16, triton.next_power_of_2(group)))


def tuned_config(group: int, head_dim: int, max_query_len: int, kv_fp8: bool = False,
                 many: bool = False) -> AttentionConfig:
    """The tile shape tuned in bf16 on an H200 (a pure function of the shapes). ``many``: the launch has at
    least half a program per multiprocessor before splitting the KV range."""
    rows = group * max_query_len
    if rows <= 64:  # decode and short speculative chunks: memory-bound, keep M small
        # Key tiles of 128 keep the most bytes in flight per program, which small batches (few programs,
        # even after splitting) need; from about half a program per multiprocessor on, 64 wins: it leaves
        # room for two programs per multiprocessor. One-byte FP8 elements halve a tile's bytes, so FP8
        # always takes 128.
        block_n = 64 if many and not kv_fp8 else 128
        block_n = min(block_n, 16384 // head_dim)  # head_dim 256+: keep a K + V stage within ~64 KB of smem
        return AttentionConfig(block_m=max(16, triton.next_power_of_2(rows)), block_n=block_n, num_warps=4,
                               num_stages=3)
    if head_dim <= 64:
        return AttentionConfig(block_m=64, block_n=128, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return AttentionConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    return AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)  # untuned: fits shared memory


def shared_memory_bytes(cfg: AttentionConfig, head_dim: int, q_bytes: int, kv_bytes: int) -> int:
    """Estimated shared memory of a launch: the pipelined K and V tiles ``[block_n, head_dim]`` (``kv_bytes``
    per element; :func:`~pdserve.kernels.smem.pipelined_kv_tiles`) and the query tile ``[block_m, head_dim]``
    (``q_bytes``; an FP8 cache's query is float16)."""
    kv = pipelined_kv_tiles(cfg.num_stages) * cfg.block_n * head_dim * kv_bytes
    return kv + cfg.block_m * head_dim * q_bytes


def fit_shared_memory(cfg: AttentionConfig, head_dim: int, q_bytes: int, kv_bytes: int, limit: int,
                      min_block_m: int = 16) -> AttentionConfig:
    """``cfg``, or the nearest smaller shape whose :func:`shared_memory_bytes` (plus slack) fits ``limit``:
    fewer pipeline stages first (down to 2), then narrower key tiles (down to 16), then fewer query rows (down
    to ``min_block_m``, which must hold the GQA group). A shape that fits is returned unchanged, so bf16 on an
    H100 / H200 keeps the tuned tiles; float32 at ``head_dim`` 128 (320 KiB for the prefill tiles) gets 2
    stages and 64-key tiles."""
    def fits(c: AttentionConfig) -> bool:
        return shared_memory_bytes(c, head_dim, q_bytes, kv_bytes) + SLACK_BYTES <= limit

    while not fits(cfg):
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 16:
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_m > min_block_m:
            cfg = dataclasses.replace(cfg, block_m=cfg.block_m // 2)
        else:
            break  # the smallest tiles: let Triton report it
    return cfg


def default_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                       block_n: int, device: torch.device) -> int:
    """KV splits so that a decode-like launch has about four programs per multiprocessor.

    Only shapes and host-side bounds enter, so a CUDA graph captured for a batch size keeps its grid. Splits
    beyond a sequence's tiles cost little (an empty split stores one log-sum-exp), so a graph captured with
    a generous ``max_seq_len`` stays fast for short contexts.
    """
    if device.type != "cuda" or max_query_len > 16:
        return 1
    splits = (4 * _num_sms(device.index or 0)) // (num_seqs * num_kv_heads)
    return max(1, min(_MAX_SPLITS, splits, triton.cdiv(max_seq_len, block_n)))


def _check(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {dtypes}, got {t.dtype}")


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sm_scale: float | None = None,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    config: AttentionConfig | None = None,
    separate_decodes: bool = False,
) -> torch.Tensor:
    """Causal attention of varlen queries over a paged KV cache; the contract of ``paged_attention_ref``.

    Args:
        q: ``[T, Hq, D]`` queries of all sequences, flattened (rows past ``query_start_loc[-1]`` are padding;
            their outputs are undefined).
        kv_cache: ``[2, num_blocks, block_size, Hkv, D]``; float16/bfloat16/float32, or float8_e4m3fn with
            ``k_scale``/``v_scale`` (the real value is ``stored * scale``).
        query_start_loc: ``[B + 1]`` int32 cumulative query lengths.
        seq_lens: ``[B]`` int32 context lengths including this step's queries.
        block_tables: ``[B, max_blocks]`` int32 physical block ids.
        sm_scale: softmax scale, ``1 / sqrt(D)`` by default.
        out: optional ``[T, Hq, D]`` output (may be a strided view).
        max_query_len: host-side bound on any sequence's query length; only picks the tile shape (any value
            gives correct results). Defaults to the static bound ``T - B + 1``, 1 for a pure decode batch.
        max_seq_len: host-side bound on ``seq_lens``, only used to cap the number of KV splits.
        num_kv_splits: force the split-KV factor (1 disables the second kernel); chosen from shapes if None.
        config: force a tile shape (tuning and tests).
        separate_decodes: when ``max_query_len`` calls for prefill-sized query tiles, run the one-token
            sequences (a mixed step's decodes) in a launch of their own with the decode tile shape, and the
            rest in the prefill-shaped launch. In one launch each decode would fill a 128-row query tile with
            its ``G`` rows, which makes a mixed step's attention compute-bound on padding (measured: 2.3x the
            time its K/V reads take on an H100). Both launches have static grids, so a CUDA graph can hold them.
    """
    _check("q", q, 3, (torch.float16, torch.bfloat16, torch.float32))
    _check("kv_cache", kv_cache, 5, (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn))
    _check("query_start_loc", query_start_loc, 1, (torch.int32,))
    _check("seq_lens", seq_lens, 1, (torch.int32,))
    _check("block_tables", block_tables, 2, (torch.int32,))
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    if kv_cache.shape[0] != 2 or cache_dim != head_dim:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not match q {tuple(q.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError("query_start_loc must be [B + 1] and block_tables [B, max_blocks] for seq_lens [B]")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1 or block_tables.stride(1) != 1:
        raise ValueError("q, kv_cache and block_tables need a contiguous last dimension")
    if kv_cache.dtype != torch.float8_e4m3fn and (k_scale != 1.0 or v_scale != 1.0):
        raise ValueError("k_scale/v_scale apply to an fp8 cache only")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    if num_seqs == 0 or num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    if max_query_len is None:
        max_query_len = num_tokens - num_seqs + 1
    kv_fp8 = kv_cache.dtype == torch.float8_e4m3fn
    cfg = config or default_config(group, head_dim, max_query_len, q.device, kv_fp8, num_seqs, num_kv_heads, q.dtype)
    if cfg.block_m < group:
        raise ValueError(f"block_m {cfg.block_m} is smaller than the GQA group {group}")
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    # Apart only where the decodes' own tile is smaller; then without split-KV, so that no combine pass runs
    # over the other launch's rows.
    apart = False
    if separate_decodes and max_query_len > 1:
        decode_cfg = default_config(group, head_dim, 1, q.device, kv_fp8, num_seqs, num_kv_heads, q.dtype)
        apart = cfg.block_m > decode_cfg.block_m
    if apart:
        _launch(q, kv_cache, out, out, out, query_start_loc, seq_lens, block_tables, (num_seqs, num_kv_heads, 1),
                decode_cfg, 1, sm_scale * k_scale, v_scale, group, query_kind=1)
        num_kv_splits = 1
    splits = num_kv_splits or default_num_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len,
                                                 cfg.block_n, q.device)
    if not 1 <= splits <= _MAX_SPLITS:
        raise ValueError(f"num_kv_splits must be in [1, {_MAX_SPLITS}], got {splits}")
    block_q = cfg.block_m // group
    if splits > 1:
        ws_out = torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        ws_lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=q.device)
    else:
        ws_out = ws_lse = out  # unused by the kernel
    _launch(q, kv_cache, out, ws_out, ws_lse, query_start_loc, seq_lens, block_tables,
            (num_tokens // block_q + num_seqs, num_kv_heads, splits), cfg, splits, sm_scale * k_scale, v_scale,
            group, query_kind=2 if apart else 0)
    if splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            ws_out, ws_lse, out, num_heads, splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=_MAX_SPLITS,
            num_warps=4,
        )
    return out


def _launch(q, kv_cache, out, ws_out, ws_lse, query_start_loc, seq_lens, block_tables, grid, cfg: AttentionConfig,
            splits: int, qk_scale: float, v_scale: float, group: int, query_kind: int) -> None:
    """One launch of the attention kernel; ``query_kind`` 0: every sequence, 1: one-token sequences only (grid
    ``(B, Hkv, 1)``), 2: the others only."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, ws_out, ws_lse,
        query_start_loc, seq_lens, block_tables,
        seq_lens.shape[0], splits, qk_scale * _LOG2E, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=q.shape[2], BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_m // group, BLOCK_N=cfg.block_n, SPLIT_KV=splits > 1,
        KV_FP8=kv_cache.dtype == torch.float8_e4m3fn, QUERY_KIND=query_kind,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
