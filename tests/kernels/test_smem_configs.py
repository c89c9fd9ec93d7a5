"""Tile shapes fit the device's shared memory in every dtype: pure functions of the shapes on CPU (float32 at
Llama-3.1-8B shapes stays under an H100's limit, bf16 keeps its tuned tiles), and float32 launches on a GPU."""

from __future__ import annotations

import pytest
import torch
from paged_cases import make_case, rel_err

from pdserve.kernels.attention import fit_shared_memory, paged_attention, shared_memory_bytes, tuned_config
from pdserve.kernels.reference import paged_attention_ref
from pdserve.kernels.skinny import MAX_ROWS
from pdserve.kernels.skinny import default_config as skinny_config
from pdserve.kernels.skinny import shared_memory_bytes as skinny_bytes
from pdserve.kernels.smem import DEFAULT_LIMIT_BYTES, SLACK_BYTES, shared_memory_limit

H100 = 227 * 1024  # shared_memory_per_block_optin of an H100 / H200
KiB = 1024
# (GQA group, head_dim): Llama-3.1-8B (32 / 8 heads, 128), Qwen3-0.6B (16 / 8, 128), Llama-3.2-1B (32 / 8, 64).
SHAPES = [(4, 128), (2, 128), (4, 64), (8, 256)]
QUERY_LENS = [1, 5, 16, 128, 2048]  # decode, a k = 4 verify chunk, longer chunks, prefill


def all_tuned(group: int, head_dim: int):
    for q_len in QUERY_LENS:
        for kv_fp8 in (False, True):
            for many in (False, True):
                yield tuned_config(group, head_dim, q_len, kv_fp8, many), kv_fp8


def test_the_float32_prefill_tile_is_what_triton_refused() -> None:
    """The estimate reproduces Triton's figure for the float32 Llama-3.1-8B prefill tile (321 KiB asked,
    320 KiB of it tiles) that failed on an H100."""
    cfg = tuned_config(4, 128, 2048)
    assert shared_memory_bytes(cfg, 128, 4, 4) == 320 * KiB
    fitted = fit_shared_memory(cfg, 128, 4, 4, H100)
    assert fitted != cfg and shared_memory_bytes(fitted, 128, 4, 4) + SLACK_BYTES <= H100


@pytest.mark.parametrize("group,head_dim", SHAPES)
@pytest.mark.parametrize("limit", [H100, DEFAULT_LIMIT_BYTES])
def test_float32_configs_fit(group, head_dim, limit) -> None:
    for cfg, kv_fp8 in all_tuned(group, head_dim):
        if kv_fp8:
            continue
        fitted = fit_shared_memory(cfg, head_dim, 4, 4, limit, max(16, group))
        assert shared_memory_bytes(fitted, head_dim, 4, 4) + SLACK_BYTES <= limit, (cfg, fitted)
        assert fitted.block_m >= group and fitted.num_warps == cfg.num_warps


@pytest.mark.parametrize("group,head_dim", SHAPES)
def test_bf16_and_fp8_configs_are_unchanged_on_an_h100(group, head_dim) -> None:
    for cfg, kv_fp8 in all_tuned(group, head_dim):
        q_bytes, kv_bytes = (2, 1) if kv_fp8 else (2, 2)
        assert fit_shared_memory(cfg, head_dim, q_bytes, kv_bytes, H100) == cfg


def test_skinny_configs() -> None:
    for m in range(1, MAX_ROWS + 1):
        for n, k in ((4096, 4096), (6144, 4096), (4096, 14336), (28672, 4096)):
            tuned = skinny_config(m, n, k)
            assert skinny_config(m, n, k, 2, H100) == tuned  # bf16 on an H100: the tuned tiles
            for limit in (H100, DEFAULT_LIMIT_BYTES):
                fitted = skinny_config(m, n, k, 4, limit)
                assert skinny_bytes(fitted, m, 4) + SLACK_BYTES <= limit, (m, fitted)
    assert skinny_config(1, 4096, 4096, 4, DEFAULT_LIMIT_BYTES) == skinny_config(1, 4096, 4096)  # registers only


def test_limit_without_a_cuda_device() -> None:
    assert shared_memory_limit(torch.device("cpu")) == shared_memory_limit(None) == DEFAULT_LIMIT_BYTES


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens,ctx_lens", [([1, 1, 1], [900, 5000, 17]), ([5, 5], [300, 40]),
                                              ([1000, 77], [1000, 1200])])
def test_gpu_float32_llama_8b_shapes_launch(q_lens, ctx_lens) -> None:
    """Llama-3.1-8B's attention (32 query heads over 8 KV heads, head_dim 128) in float32: decode, a verify
    chunk and prefill run with the default tiles (their float32 prefill tile once exceeded the H100's limit)."""
    case = make_case(q_lens, ctx_lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                     dtype=torch.float32, device="cuda")
    out = paged_attention(**case)
    ref = paged_attention_ref(**case, sm_scale=128 ** -0.5)
    real = int(case["query_start_loc"][-1])
    assert rel_err(out[:real], ref[:real]) < 2e-3
