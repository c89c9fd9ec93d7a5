"""The skinny matmul and fused SiLU-and-multiply against their references, and their use in the model layers.

CPU (Triton's interpreter): small shapes, float16/float32 (the interpreter rounds bfloat16 differently).
GPU: the projection shapes of Llama-3.1-8B and Qwen3-0.6B at every decode batch size 1..16 in bf16/fp16,
CUDA-graph capture and run-to-run determinism, and SiLU-and-multiply bit-identical to torch's two kernels.

Tolerances: the skinny matmul accumulates in float32 in another order than the reference, then rounds once to
the output dtype, so results may differ by an ulp or two of that dtype: rtol 1e-2 (bf16, ~2.5 ulp) or 2e-3
(fp16), atol a tenth of that relative to outputs of unit scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels import reference as ref
from pdserve.kernels.ops import silu_and_mul, skinny_linear
from pdserve.kernels.skinny import MAX_ROWS, SkinnyConfig, default_config, prefers_skinny

TOL = {torch.bfloat16: dict(rtol=1e-2, atol=1e-3), torch.float16: dict(rtol=2e-3, atol=2e-4),
       torch.float32: dict(rtol=1e-5, atol=1e-5)}
CPU_CONFIGS = [SkinnyConfig(8, 32), SkinnyConfig(4, 32, prefetch=True), SkinnyConfig(16, 64, use_dot=True)]


def _problem(m: int, n: int, k: int, dtype, device, bias: bool = False, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=torch.float32, generator=g).to(dtype)
    w = (torch.randn(n, k, device=device, dtype=torch.float32, generator=g) * k ** -0.5).to(dtype)
    b = torch.randn(n, device=device, dtype=torch.float32, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("cfg", CPU_CONFIGS, ids=["fma", "fma-prefetch", "dot"])
@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 96, False), (3, 24, 64, True), (16, 16, 80, False)])
def test_skinny_linear(device, dtype, cfg, m, n, k, bias):
    # n not a multiple of block_n and k not a multiple of block_k exercise both masks.
    x, w, b = _problem(m, n, k, dtype, device, bias)
    torch.testing.assert_close(skinny_linear(x, w, b, config=cfg), ref.linear_ref(x, w, b), **TOL[dtype])


@pytest.mark.parametrize("m,n", [(1, 32), (2, 32), (2, 4100), (6, 32)])
def test_skinny_linear_default_config_and_strided_x(device, m, n):
    x, w, _ = _problem(m, n, 64, torch.float16, device)
    wide = torch.zeros(m, 100, device=device, dtype=torch.float16)
    wide[:, 10:74] = x
    got = skinny_linear(wide[:, 10:74], w)  # a row-strided view, as a slice of a fused output would be
    torch.testing.assert_close(got, ref.linear_ref(x, w), **TOL[torch.float16])


def test_skinny_linear_rejects_bad_inputs(device):
    x, w, _ = _problem(2, 8, 16, torch.float16, device)
    with pytest.raises(ValueError, match="weight"):
        skinny_linear(x, w[:, :8])
    with pytest.raises(TypeError):
        skinny_linear(x, w.float())
    with pytest.raises(ValueError, match="contiguous"):
        skinny_linear(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, w, torch.zeros(4, device=device, dtype=torch.float16))


def test_rule_is_for_decode_sizes_only():
    assert not prefers_skinny(MAX_ROWS + 1, 4096, 4096) and not prefers_skinny(0, 4096, 4096)
    assert prefers_skinny(1, 6144, 4096) and prefers_skinny(1, 4096, 14336) and prefers_skinny(2, 4096, 4096)
    assert not prefers_skinny(1, 28672, 4096) and not prefers_skinny(2, 4096, 14336)  # cuBLAS is as fast
    assert not prefers_skinny(3, 4096, 4096)
    for m in range(1, MAX_ROWS + 1):
        cfg = default_config(m, 4096, 4096)
        assert cfg.block_n >= (16 if cfg.use_dot else 1) and cfg.block_k >= 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_silu_and_mul(device, dtype):
    x = (torch.randn(5, 2 * 40, device=device) * 4).to(dtype)
    got = silu_and_mul(x)
    torch.testing.assert_close(got, ref.silu_and_mul_ref(x), rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=0)
    x3 = x.view(5, 2, 40)  # leading dims are flattened
    torch.testing.assert_close(silu_and_mul(x3.reshape(5, 1, 80)).view(5, 40), got, rtol=0, atol=0)


def test_silu_reference_matches_torch():
    x = torch.randn(7, 64, dtype=torch.bfloat16) * 4
    assert torch.equal(ref.silu_and_mul_ref(x), F.silu(x[:, :32]) * x[:, 32:])


def test_layers_use_the_kernels_only_where_they_fit(device):
    from pdserve.engine.models.layers import Linear, SiluAndMul

    act = SiluAndMul()
    act.use_kernels = True
    x = torch.randn(3, 64, device=device, dtype=torch.float16)
    torch.testing.assert_close(act(x), F.silu(x[:, :32]) * x[:, 32:], rtol=1e-3, atol=0)
    lin = Linear(32, 48).to(device=device, dtype=torch.float16)
    torch.nn.init.normal_(lin.weight, std=0.1)
    lin.use_kernels = True
    torch.testing.assert_close(lin(x[:, :32]), F.linear(x[:, :32], lin.weight), **TOL[torch.float16])
    x3 = x[:, :32].reshape(3, 1, 32)  # not 2-D: always F.linear
    assert torch.equal(lin(x3), F.linear(x3, lin.weight))


def test_model_sets_the_switch_with_triton_attention():
    from pdserve.engine.models.layers import Linear, RMSNorm, SiluAndMul
    from pdserve.engine.models.llama import LlamaForCausalLM
    from pdserve.engine.worker.torch_attention import TorchAttentionBackend
    from pdserve.engine.worker.triton_attention import TritonAttentionBackend
    from tests.helpers.tiny_models import tiny_hf_config

    config = tiny_hf_config("llama")
    for backend, want in ((TritonAttentionBackend(), True), (TorchAttentionBackend(), False)):
        model = LlamaForCausalLM(config, backend)
        switched = [m for m in model.modules() if isinstance(m, (Linear, RMSNorm, SiluAndMul))]
        assert len(switched) > 10 and all(m.use_kernels is want for m in switched)


# --------------------------------------------------------------------------------------------------------- GPU

# (K, N) of every projection of Llama-3.1-8B and Qwen3-0.6B.
GPU_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),
              (1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", GPU_SHAPES)
def test_gpu_skinny_linear_model_shapes(dtype, k, n):
    for m in range(1, MAX_ROWS + 1):
        x, w, _ = _problem(m, n, k, dtype, "cuda", seed=m)
        torch.testing.assert_close(skinny_linear(x, w), ref.linear_ref(x, w), **TOL[dtype], msg=f"M={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [None, SkinnyConfig(16, 256, use_dot=True), SkinnyConfig(8, 512),
                                 SkinnyConfig(8, 256, prefetch=True)], ids=["default", "dot", "fma", "prefetch"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gpu_skinny_linear_bias_ragged_and_deterministic(cfg, m):
    x, w, b = _problem(m, 1000, 1000, torch.bfloat16, "cuda", bias=True)  # neither dim a multiple of the tiles
    got = skinny_linear(x, w, b, config=cfg)
    torch.testing.assert_close(got, ref.linear_ref(x, w, b), **TOL[torch.bfloat16])
    assert all(torch.equal(skinny_linear(x, w, b, config=cfg), got) for _ in range(3))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_skinny_linear_in_cuda_graph(m):
    x, w, _ = _problem(m, 4096, 4096, torch.bfloat16, "cuda")
    static_x = x.clone()
    skinny_linear(static_x, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = skinny_linear(static_x, w)
    for seed in (1, 2):
        new_x = _problem(m, 4096, 4096, torch.bfloat16, "cuda", seed=seed)[0]
        static_x.copy_(new_x)
        graph.replay()
        assert torch.equal(static_out, skinny_linear(new_x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,inter", [(1, 14336), (7, 3072), (300, 1000)])
def test_gpu_silu_and_mul_bit_identical_to_torch(dtype, tokens, inter):
    x = torch.randn(tokens, 2 * inter, device="cuda", dtype=dtype) * 6
    assert torch.equal(silu_and_mul(x), F.silu(x[:, :inter]) * x[:, inter:])
