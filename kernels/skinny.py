"""Skinny matmul ``y = x W^T (+ b)`` for a handful of rows of ``x`` (the decode batch): a weight stream.

With ``M <= 16`` rows a projection is a read of the weight and little else: 2 FLOPs per weight element per row.
So the kernel is shaped for memory, not for the tensor cores:

* **One pass over the weight, no split-K.** A program owns ``BLOCK_N`` output features (weight rows) and walks
  the whole of ``K`` in ``BLOCK_K`` steps, so every weight byte is read once and there is no partial-sum
  workspace, no second reduction launch and no atomics: results are bitwise the same on every run.
  Parallelism comes from thin row blocks instead (``N / BLOCK_N`` programs, several per SM).
* **Deep loads.** Each step loads a ``[BLOCK_N, BLOCK_K]`` weight tile with 16-byte vector loads, and the
  FMA path issues the next tile's loads before it multiplies the current one (Triton's pipeliner leaves loads
  that feed no ``tl.dot`` alone), so each program keeps two tiles in flight; with thousands of small programs
  that covers DRAM latency. One row of x: 2 x 1024 tiles, ``N / 2`` programs.
* **Two inner products.** For ``M`` up to a few rows the tile is multiplied on the CUDA cores into a
  ``[BLOCK_M, BLOCK_N, BLOCK_K]`` float32 accumulator that is reduced over ``K`` once, after the loop (no
  shuffles per step). For more rows ``x`` is padded to 16 and fed to ``tl.dot`` with the weight tile.
* **Capturable.** The grid depends on the shapes alone and the kernel allocates only its output, so a launch
  records into a CUDA graph and replays.

:func:`prefers_skinny` is the measured rule for when this beats ``F.linear`` (cuBLAS); see its docstring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.kernels.smem import SLACK_BYTES, pipelined_tiles, shared_memory_limit

MAX_ROWS = 16  # the kernel handles any M; it was tuned up to this many rows (and is chosen only for 1 or 2)


@dataclass(frozen=True)
class SkinnyConfig:
    """Tile shape and launch parameters of one skinny-matmul launch."""

    block_n: int  # output features per program
    block_k: int  # reduction elements per loop step
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False  # tensor-core dot with M padded to 16, instead of CUDA-core FMAs
    prefetch: bool = False  # FMA path: load tile i+1 before multiplying tile i (Triton does not pipeline these)


@triton.jit
def _load_fma_tiles(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, k_left, EVEN_K: tl.constexpr):
    """The ``[BM, 1, BK]`` tile of x and ``[1, BN, BK]`` tile of the weight at the pointers, ``k_left`` columns
    from the end of K."""
    if EVEN_K:
        x = tl.load(x_ptrs, mask=m_ok[:, None, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[None, :, None], other=0.0)
    else:
        k_ok = (offs_k < k_left)[None, None, :]
        x = tl.load(x_ptrs, mask=m_ok[:, None, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[None, :, None] & k_ok, other=0.0)
    return x, w


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
                   PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if USE_DOT:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN, BK]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = (offs_k < K - k0)[None, :]
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    else:
        x_ptrs = x_ptr + offs_m[:, None, None] * stride_xm + offs_k[None, None, :]  # [BM, 1, BK]
        w_ptrs = w_ptr + offs_n[None, :, None].to(tl.int64) * stride_wn + offs_k[None, None, :]  # [1, BN, BK]
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        x, w = _load_fma_tiles(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, K, EVEN_K)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            if PREFETCH:  # issue the next tile's loads before this tile's FMAs: twice the bytes in flight
                x_next, w_next = _load_fma_tiles(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, K - k0, EVEN_K)
                acc3 += x.to(tl.float32) * w.to(tl.float32)
                x, w = x_next, w_next
            else:
                acc3 += x.to(tl.float32) * w.to(tl.float32)
                x, w = _load_fma_tiles(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, K - k0, EVEN_K)
        acc3 += x.to(tl.float32) * w.to(tl.float32)
        acc = tl.sum(acc3, axis=2)  # [BM, BN]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(m: int, n: int, k: int, element_size: int = 2, smem_limit: int | None = None) -> SkinnyConfig:
    """The tile shape used when none is given, from ``pdserve bench kernels --mode gemv --sweep`` on
    an H200. One row, or two rows of a narrow weight: 2-row blocks with 1024-wide prefetched steps (best or
    near-best on every Llama-3.1-8B and Qwen3-0.6B projection; thin blocks give N = 1024 enough programs).
    Two rows of a wider weight: 8-row blocks of 256. More rows: the tensor-core path.

    ``smem_limit``: the device's shared memory per block; the tensor-core path's pipelined tiles
    (:func:`shared_memory_bytes`, ``element_size`` bytes per element) are shrunk to fit it, fewer stages first
    (bf16 fits an H100 / H200 unchanged; the FMA paths keep their tiles in registers)."""
    if m == 1 or (m == 2 and n <= 2048):
        return SkinnyConfig(block_n=2, block_k=1024, num_warps=4, num_stages=1, prefetch=True)
    if m == 2:
        return SkinnyConfig(block_n=8, block_k=256, num_warps=4, num_stages=1, prefetch=True)
    cfg = SkinnyConfig(block_n=32, block_k=256, num_warps=4, num_stages=4, use_dot=True)
    while smem_limit is not None and shared_memory_bytes(cfg, m, element_size) + SLACK_BYTES > smem_limit:
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_k > 32:
            cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
        else:
            break  # the smallest tiles: let Triton report it
    return cfg


def shared_memory_bytes(cfg: SkinnyConfig, m: int, element_size: int) -> int:
    """Estimated shared memory of a launch: the tensor-core path's pipelined ``x`` tile ``[max(16, M), BK]``
    and weight tile ``[BN, BK]``; the FMA paths load into registers (none)."""
    if not cfg.use_dot:
        return 0
    block_m = max(16, triton.next_power_of_2(m))
    return pipelined_tiles(cfg.num_stages) * (block_m + cfg.block_n) * cfg.block_k * element_size


# Largest weight (N * K elements) for which the skinny kernel beats cuBLAS, by rows of x.
_MAX_WEIGHT_ELEMS = {1: 64 << 20, 2: 32 << 20}


def prefers_skinny(m: int, n: int, k: int) -> bool:
    """Whether :func:`skinny_linear` beats ``F.linear`` (cuBLAS) for ``x [m, k] @ W[n, k]^T`` in bf16/fp16.

    The rule: ``m == 1`` and a weight of at most 64 Mi elements, or ``m == 2`` and at most 32 Mi. Measured on
    an H200 (bf16, CUDA-graph replays, weights streamed from DRAM), microseconds, ours vs cuBLAS:

    ==============================  =====================  =====================
    shape (K -> N)                  M = 1                  M = 2
    ==============================  =====================  =====================
    Llama-8B qkv 4096 -> 6144       15.0 vs 16.6           15.8 vs 16.5
    Llama-8B o 4096 -> 4096         10.9 vs 12.8           12.7 vs 12.8
    Llama-8B down 14336 -> 4096     31.4 vs 32.7           38.6 vs 32.5  cuBLAS
    Llama-8B gate_up 4096 -> 28672  59.6 vs 58.4  cuBLAS   64.5 vs 59.2  cuBLAS
    Llama-8B lm_head 4096 -> 128k   248 vs 252    (tie)    267 vs 250    cuBLAS
    Qwen3-0.6B qkv 1024 -> 4096     4.5 vs 5.3             4.9 vs 5.3
    Qwen3-0.6B o 2048 -> 1024       3.3 vs 12.9            3.5 vs 12.5 *
    Qwen3-0.6B gate_up 1024 -> 6144 5.8 vs 6.2             5.7 vs 6.3
    Qwen3-0.6B down 3072 -> 1024    4.0 vs 6.8             4.2 vs 6.7 *
    ==============================  =====================  =====================

    (* with the 2-row tiles that :func:`default_config` now picks for narrow weights at M = 2, from the sweep;
    8-row tiles measured 5.9 and 7.9.) In a Llama-3.1-8B batch-1 decode step (32 layers, CUDA graph) this took
    qkv + o + down from 59.7 to 54.5 us per layer, cuBLAS's split-K reductions included. From M = 3 on cuBLAS
    picks tensor-core tiles 8 columns wide that read the weight at about the same speed as for one row, while
    this kernel's dot path reaches only 0.8-1.0x of it, so M > 2 stays with cuBLAS. The weight bound keeps the
    huge matrices (gate_up, lm_head), which cuBLAS streams at 4.0-4.2 TB/s, with cuBLAS.
    """
    return n * k <= _MAX_WEIGHT_ELEMS.get(m, 0)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x [M, K]`` and a row-major ``weight [N, K]``; returns ``[M, N]`` in
    ``x``'s dtype, accumulated in float32. Fast for small ``M`` (see :func:`prefers_skinny`); correct for any.

    ``x`` and ``weight`` need a contiguous last dim and the same dtype (bf16, fp16 or fp32); ``bias`` is ``[N]``.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x and weight must share a float16/bfloat16/float32 dtype; got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dim")
    m, k = x.shape
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or default_config(m, n, k, x.element_size(), shared_memory_limit(x.device) if x.is_cuda else None)
    block_m = max(16, triton.next_power_of_2(m)) if cfg.use_dot else triton.next_power_of_2(m)
    _skinny_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, bias if bias is not None else x, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        HAS_BIAS=bias is not None, USE_DOT=cfg.use_dot, PREFETCH=cfg.prefetch,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
