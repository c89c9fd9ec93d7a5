"""Builders of random paged-attention problems shared by the kernel tests."""

from __future__ import annotations

import torch

from pdserve.kernels.reference import quantize_fp8


def poison_slots(kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Write NaN (0x7f, also NaN, in fp8) into ``slots`` of a contiguous cache, so that a read that should have
    been masked shows up in the output."""
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    if kv_cache.dtype == torch.float8_e4m3fn:
        kv_cache.view(torch.uint8).view(2, num_slots, -1)[:, slots] = 0x7F
    else:
        kv_cache.view(2, num_slots, -1)[:, slots] = float("nan")


def make_case(q_lens: list[int], ctx_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype, device, cache_dtype: torch.dtype | None = None,
              scale: float = 1.0, pad_tokens: int = 0, seed: int = 0) -> dict:
    """A batch of sequences: sequence ``b`` has ``ctx_lens[b]`` tokens of context, its last ``q_lens[b]`` being
    this step's queries. Blocks are scattered at random; every cache slot that no sequence owns, and the
    block-table padding, hold NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    blocks_per = [(c + block_size - 1) // block_size for c in ctx_lens]
    num_blocks = sum(blocks_per) + 2  # the last block stays NaN: block-table padding points at it
    values = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    kv_cache = quantize_fp8(values, scale) if cache_dtype == torch.float8_e4m3fn else values.to(cache_dtype)
    perm = torch.randperm(num_blocks - 1, generator=gen)[: sum(blocks_per)]
    block_tables = torch.full((len(ctx_lens), max(blocks_per + [1]) + 1), num_blocks - 1, dtype=torch.int32)
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    i = 0
    for b, n in enumerate(blocks_per):
        block_tables[b, :n] = perm[i:i + n]
        i += n
        pos = torch.arange(ctx_lens[b])
        owned[block_tables[b, pos // block_size].long() * block_size + pos % block_size] = True
    poison_slots(kv_cache, (~owned).nonzero().flatten())
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    num_tokens = int(query_start_loc[-1]) + pad_tokens
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    return dict(
        q=q.to(device), kv_cache=kv_cache.to(device), query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device), block_tables=block_tables.to(device),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN if ``out`` holds any NaN)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
