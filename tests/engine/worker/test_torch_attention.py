"""The pure-torch paged attention backend against a naive per-token reference."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.attention import get_attention_backend
from pdserve.engine.worker.input_batch import build_inputs
from pdserve.engine.worker.torch_attention import TorchAttentionBackend

BLOCK = 4
HQ, HKV, D = 8, 2, 16
NUM_BLOCKS = 40


def naive_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int) -> torch.Tensor:
    """One token at position ``pos``: ``q [Hq, D]`` over ``keys/values [>pos, Hkv, D]`` -> ``[Hq, D]``."""
    out = torch.empty_like(q)
    group = HQ // HKV
    for h in range(HQ):
        k, v = keys[: pos + 1, h // group].double(), values[: pos + 1, h // group].double()
        scores = (k @ q[h].double()) / math.sqrt(D)
        out[h] = (torch.softmax(scores, 0) @ v).to(q.dtype)
    return out


def run_case(chunks_spec, cache_dtype=torch.float32, seed=0):
    """``chunks_spec``: (context_len, query_len) per sequence. Returns (backend output, reference, cache, batch).

    Each sequence gets a shuffled block table; its cached prefix is written straight into the cache."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK, HKV, D, dtype=cache_dtype)
    chunks, histories, qs, ks, vs = [], [], [], [], []
    for i, (ctx, n) in enumerate(chunks_spec):
        nblk = (ctx + n + BLOCK - 1) // BLOCK
        blocks, perm = perm[:nblk], perm[nblk:]
        full_k = torch.randn(ctx + n, HKV, D, generator=g)
        full_v = torch.randn(ctx + n, HKV, D, generator=g)
        for p in range(ctx):  # the cached prefix
            cache[0, blocks[p // BLOCK], p % BLOCK] = full_k[p].to(cache_dtype)
            cache[1, blocks[p // BLOCK], p % BLOCK] = full_v[p].to(cache_dtype)
        chunks.append(ScheduledChunk(f"r{i}", [0] * n, ctx, blocks, True))
        # What the backend sees is what the cache stores: round the reference's K/V the same way.
        histories.append((full_k.to(cache_dtype).float(), full_v.to(cache_dtype).float()))
        qs.append(torch.randn(n, HQ, D, generator=g))
        ks.append(full_k[ctx:])
        vs.append(full_v[ctx:])
    batch = build_inputs(SchedulerOutput(chunks=chunks), BLOCK, torch.device("cpu"))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    out = TorchAttentionBackend().forward(q, k, v, cache, batch.attn_metadata)
    ref = torch.empty_like(q)
    row = 0
    for (ctx, n), (hk, hv) in zip(chunks_spec, histories):
        for j in range(n):
            ref[row] = naive_attention(q[row], hk, hv, ctx + j)
            row += 1
    return out, ref, cache, batch, (k, v)


@pytest.mark.parametrize("spec", [
    [(9, 1), (0, 1), (3, 1)],  # decode rows only (one of them the very first token)
    [(0, 7)],  # a fresh prefill
    [(6, 5)],  # a chunk on top of a cached prefix that ends mid-block
    [(8, 1), (2, 1), (0, 9), (5, 6), (4, 1)],  # everything mixed; a one-token chunk after the prefills
])
def test_matches_naive_reference(spec) -> None:
    out, ref, *_ = run_case(spec)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_new_kv_written_to_slots() -> None:
    _, _, cache, batch, (k, v) = run_case([(3, 1), (0, 5), (6, 3)])
    slots = batch.attn_metadata.slot_mapping
    flat = cache.view(2, -1, HKV, D)
    torch.testing.assert_close(flat[0, slots], k)
    torch.testing.assert_close(flat[1, slots], v)


def test_fp8_cache() -> None:
    out, ref, cache, *_ = run_case([(5, 1), (0, 6), (7, 4)], cache_dtype=torch.float8_e4m3fn)
    assert cache.dtype == torch.float8_e4m3fn
    # Fresh prefills attend over their unrounded K/V, so the comparison is loose.
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.1)


def test_backend_selection() -> None:
    assert get_attention_backend("torch", torch.device("cpu")).name == "torch"
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash", torch.device("cpu"))
