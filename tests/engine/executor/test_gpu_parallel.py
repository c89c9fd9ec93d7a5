"""On two or more CUDA GPUs (skipped otherwise): tensor and pipeline parallelism over NCCL give the greedy tokens of
one GPU, with the Triton path and its decode CUDA graphs (the tensor-parallel all-reduces captured inside them),
on tiny models in float32 -- and the bundled model at TP=3 where three GPUs exist."""

from __future__ import annotations

import gc

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

PROMPTS = [[5, 17, 33, 9, 12, 99, 4, 8, 21], [7, 8, 9, 10], list(range(3, 60))]


def _greedy(model: str, max_tokens: int = 12, **kwargs) -> list[list[int]]:
    llm = LLM(model, device="cuda", dtype="float32", max_num_seqs=8, gpu_memory_utilization=0.3,
              attention_backend="triton", **kwargs)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.engine.core.shutdown()
        del llm
        gc.collect()  # the one-GPU engine's memory would count against rank 0's KV budget
        torch.cuda.empty_cache()


def _need_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")


@pytest.mark.parametrize(("arch", "tp", "pp"), [("llama", 2, 1), ("qwen3", 2, 1), ("qwen2", 1, 2)])
def test_parallel_matches_one_gpu(arch: str, tp: int, pp: int, tmp_path) -> None:
    _need_gpus(tp * pp)
    model = make_tiny_model(arch, tmp_path / arch)
    expected = _greedy(model)
    assert _greedy(model, tensor_parallel_size=tp, pipeline_parallel_size=pp) == expected
    assert _greedy(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, enforce_eager=True) == expected


def test_bundled_model_tp3_matches_one_gpu() -> None:
    _need_gpus(3)
    expected = _greedy("smollm2-135m-instruct", max_tokens=8)
    assert _greedy("smollm2-135m-instruct", max_tokens=8, tensor_parallel_size=3) == expected
