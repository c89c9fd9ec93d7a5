"""Paged attention kernel against its torch reference.

CPU (interpreter) cases are few and tiny; the ``gpu`` ones sweep head dims, GQA ratios, block sizes and batch
shapes. Every case poisons unowned cache slots and block-table padding with NaN, and pads the token batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from paged_cases import make_case, rel_err

from pdserve.kernels.attention import AttentionConfig, paged_attention
from pdserve.kernels.reference import paged_attention_ref

FP8 = torch.float8_e4m3fn


def check(case: dict, tol: float, scale: float = 1.0, **kwargs) -> torch.Tensor:
    sm_scale = kwargs.pop("sm_scale", 1.0 / math.sqrt(case["q"].shape[-1]))
    out = paged_attention(**case, sm_scale=sm_scale, k_scale=scale, v_scale=scale, **kwargs)
    ref = paged_attention_ref(**case, sm_scale=sm_scale, k_scale=scale, v_scale=scale)
    real = int(case["query_start_loc"][-1])
    assert not out[:real].isnan().any()
    err = rel_err(out[:real], ref[:real])
    assert err < tol, err
    return out


# ---------------------------------------------------------------------------------------------- CPU (interpreter)

MIXED = dict(q_lens=[1, 1, 7, 20], ctx_lens=[1, 37, 7, 50])  # decodes, a fresh prefill, a chunk on a prefix


@pytest.mark.parametrize("splits", [1, 3])
def test_mixed_batch(device, splits):
    case = make_case(**MIXED, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
                     device=device, pad_tokens=3)
    check(case, 2e-3 if device.type == "cuda" else 1e-5, num_kv_splits=splits)


@pytest.mark.parametrize(("q_lens", "ctx_lens"), [
    ([1, 1, 7, 20], [1, 37, 7, 50]),  # decodes first, as the scheduler orders them
    ([7, 1, 0, 20, 1], [7, 37, 4, 50, 70]),  # any order, and an empty (padding) sequence
    ([20, 7], [50, 7])])  # no decode at all: the decode launch does nothing
def test_decodes_apart_from_prefill_chunks(device, q_lens, ctx_lens):
    case = make_case(q_lens, ctx_lens, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                     dtype=torch.float32, device=device, pad_tokens=3)
    # A prefill-sized query tile (32 rows) makes the one-token sequences run in a launch of their own.
    check(case, 2e-3 if device.type == "cuda" else 1e-5, separate_decodes=True,
          config=AttentionConfig(block_m=32, block_n=16))


def test_odd_group_decode_split(device):
    # 3 query heads per KV head: the tile holds 5 tokens x 3 heads, one row idle.
    case = make_case([1, 1, 1], [70, 5, 33], num_heads=6, num_kv_heads=2, head_dim=16, block_size=32,
                     dtype=torch.float16, device=device)
    check(case, 2e-3, num_kv_splits=2)


def test_tile_spans_blocks(device):
    # 8 heads share one KV head; key tiles of 32 read two 16-token blocks each.
    case = make_case([3, 1], [40, 21], num_heads=8, num_kv_heads=1, head_dim=16, block_size=16,
                     dtype=torch.float32, device=device)
    check(case, 2e-3 if device.type == "cuda" else 1e-5, config=AttentionConfig(block_m=32, block_n=32))


def test_fp8_cache(device):
    case = make_case(**MIXED, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float16,
                     device=device, cache_dtype=FP8, scale=0.05)
    check(case, 2e-3, scale=0.05, num_kv_splits=2)


def test_strided_views_and_empty_sequence(device):
    case = make_case([5, 0, 2], [9, 4, 30], num_heads=2, num_kv_heads=2, head_dim=16, block_size=16,
                     dtype=torch.float32, device=device)
    qkv = torch.randn(case["q"].shape[0], 4, 16, device=device)  # q as a view of a fused projection
    qkv[:, :2] = case["q"]
    case["q"] = qkv[:, :2]
    out_buf = torch.full((case["q"].shape[0], 3, 16), 7.0, device=device)
    out = check(case, 2e-3 if device.type == "cuda" else 1e-5, out=out_buf[:, 1:], sm_scale=0.3)
    assert out.data_ptr() == out_buf[:, 1:].data_ptr()
    assert (out_buf[:, 0] == 7.0).all()


def test_rejects_bad_inputs(device):
    case = make_case([1], [5], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32,
                     device=device)
    with pytest.raises(TypeError):
        paged_attention(**{**case, "seq_lens": case["seq_lens"].long()})
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(**{**case, "q": case["q"][:, :3]})
    with pytest.raises(ValueError, match="fp8"):
        paged_attention(**case, k_scale=2.0)
    with pytest.raises(ValueError, match="head_dim"):
        bad = make_case([1], [5], num_heads=2, num_kv_heads=1, head_dim=24, block_size=16,
                        dtype=torch.float32, device=device)
        paged_attention(**bad)


# --------------------------------------------------------------------------------------------------------- GPU

SCENARIOS = {
    "decode": ([1, 1, 1, 1, 1], [1, 17, 513, 2000, 4097]),
    "prefill": ([300, 1000, 77], [300, 1000, 77]),
    "mixed": ([1, 1, 200, 64, 1], [3000, 40, 1200, 64, 1]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_shapes(head_dim, group, block_size, scenario):
    q_lens, ctx_lens = SCENARIOS[scenario]
    case = make_case(q_lens, ctx_lens, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                     block_size=block_size, dtype=torch.bfloat16, device="cuda", pad_tokens=5)
    check(case, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_decodes_apart_in_a_mixed_step(group):
    # Decodes among prefill chunks; the chunks' max query length picks 128-row tiles for the prefill launch.
    q_lens, ctx_lens = [1] * 40 + [300, 1, 77], [900] * 20 + [33] * 20 + [300, 5000, 1077]
    case = make_case(q_lens, ctx_lens, num_heads=2 * group, num_kv_heads=2, head_dim=128, block_size=16,
                     dtype=torch.bfloat16, device="cuda", pad_tokens=5)
    check(case, 1e-2, separate_decodes=True, max_query_len=300)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4, 32])
@pytest.mark.parametrize("q_len", [1, 4])
def test_gpu_decode_splits_and_spec_tokens(q_len, splits):
    case = make_case([q_len] * 3, [q_len, 900, 5000], num_heads=32, num_kv_heads=8, head_dim=128,
                     block_size=16, dtype=torch.float16, device="cuda")
    check(case, 5e-3, num_kv_splits=splits, max_query_len=q_len)


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", ["decode", "mixed"])
@pytest.mark.parametrize("group", [4, 8])
def test_gpu_fp8(group, scenario):
    q_lens, ctx_lens = SCENARIOS[scenario]
    case = make_case(q_lens, ctx_lens, num_heads=2 * group, num_kv_heads=2, head_dim=128, block_size=16,
                     dtype=torch.bfloat16, device="cuda", cache_dtype=FP8, scale=0.02)
    check(case, 1e-2, scale=0.02)


def capture_launch(static: dict, max_query_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """One attention launch on ``static``'s buffers captured in a CUDA graph (after an eager run that compiles
    the kernel); the graph and its output buffer."""
    torch.cuda.synchronize()
    paged_attention(**static, max_query_len=max_query_len, max_seq_len=4096)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(**static, max_query_len=max_query_len, max_seq_len=4096)
    return graph, out


def load_case(static: dict, new: dict, names: tuple[str, ...]) -> None:
    """Copy case ``new`` into the captured buffers: its KV blocks, its block tables (the rest of each row points
    at the NaN block), and the tensors ``names``."""
    nb = new["kv_cache"].shape[1]
    static["kv_cache"][:, :nb].copy_(new["kv_cache"])
    width = new["block_tables"].shape[1]
    static["block_tables"].fill_(nb - 1)  # NaN block
    static["block_tables"][:, :width].copy_(new["block_tables"])
    for name in names:
        static[name].copy_(new[name])


def reference_of(case: dict) -> torch.Tensor:
    """The torch reference of a head-dim-128 case."""
    return paged_attention_ref(case["q"], case["kv_cache"], case["query_start_loc"], case["seq_lens"],
                               case["block_tables"], 1.0 / math.sqrt(128))


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    # Capture one decode launch on static buffers, then replay it on other lengths and block tables.
    shape = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")
    static = make_case([1] * 4, [3000] * 4, **shape)
    graph, out = capture_launch(static, max_query_len=1)
    for seed, lens in enumerate([[5, 2999, 17, 1024], [3000, 1, 64, 700]]):
        new = make_case([1] * 4, lens, **shape, seed=seed + 1)
        load_case(static, new, ("seq_lens", "q"))
        graph.replay()
        assert rel_err(out, reference_of(static)) < 1e-2


def test_verify_graph_layout_zero_length_padding_sequences(device):
    # A verify graph's step (engine/worker/verify_layout.py): varlen chunks of up to k + 1 = 5 tokens, then
    # zero-token padding sequences (seq_len 0, a NaN block-table row) and padding rows no sequence owns.
    case = make_case([5, 1, 3, 0, 0], [20, 9, 40, 0, 0], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                     dtype=torch.float32, device=device, pad_tokens=16)
    check(case, 2e-3 if device.type == "cuda" else 1e-5, num_kv_splits=3, max_query_len=5)


@pytest.mark.gpu
def test_gpu_verify_graph_replay_with_varlen_layouts():
    # One capture at N = 4 sequences x 5 rows; replays with other query_start_loc layouts (query lengths are data).
    shape = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")
    static = make_case([5] * 4, [3000] * 4, **shape)
    graph, out = capture_launch(static, max_query_len=5)
    for seed, (q_lens, ctx) in enumerate([([5, 1, 3, 0], [2999, 17, 1024, 0]), ([2, 0, 0, 0], [700, 0, 0, 0]),
                                          ([5, 5, 5, 5], [5, 64, 3000, 129])]):
        new = make_case(q_lens, ctx, **shape, seed=seed + 1, pad_tokens=20 - sum(q_lens))
        load_case(static, new, ("seq_lens", "query_start_loc", "q"))
        graph.replay()
        real = sum(q_lens)
        ref = reference_of(static)
        assert not out[:real].isnan().any()
        assert rel_err(out[:real], ref[:real]) < 1e-2
