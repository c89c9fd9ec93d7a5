"""Tensor and pipeline parallelism on CPU (gloo): greedy outputs token-identical to one device, with chunked
prefill, prefix caching and preemption in play (issue 15, acceptance 1).

Each parallel engine runs one worker process per rank; the reference runs in this process. The workload is
sized so that the scheduler chunks the prompts (8-token budget), finds a cached prefix (the prompts share two
blocks) and preempts (7 blocks of 4 tokens cannot hold all three sequences), which the reference run asserts.
"""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=7, max_num_batched_tokens=8,
              max_model_len=64, enable_prefix_caching=True)
SHARED = [11, 12, 13, 14, 15, 16, 17, 18]
PROMPTS = [SHARED + [21, 22, 23], SHARED + [31, 32], SHARED + [41, 42, 43, 44]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

_reference: dict[str, list[list[int]]] = {}


def _generate(model: str, prompts, params, **kwargs) -> tuple[list[list[int]], object]:
    llm = LLM(model, **{**ENGINE, **kwargs})
    try:
        outs = llm.generate(prompts, params)
        return [list(o.outputs[0].token_ids) for o in outs], llm.engine.core.get_stats()
    finally:
        llm.engine.core.shutdown()


def _reference_tokens(model: str, prompts, params, **kwargs) -> list[list[int]]:
    if model not in _reference:
        tokens, stats = _generate(model, prompts, params, **kwargs)
        # The workload really exercises what it claims to (the parallel runs schedule identically).
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        _reference[model] = tokens
    return _reference[model]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    # 4 query heads, 2 KV heads: TP=4 replicates each KV head on two ranks.
    return {arch: make_tiny_model(arch, root / arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.mark.parametrize(("arch", "tp", "pp"), [("llama", 2, 1), ("qwen2", 4, 1), ("qwen3", 2, 2), ("llama", 1, 2)])
def test_tiny_models_match_one_device(tiny, arch: str, tp: int, pp: int) -> None:
    expected = _reference_tokens(tiny[arch], PROMPTS, GREEDY)
    got, _ = _generate(tiny[arch], PROMPTS, GREEDY, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert got == expected


@pytest.mark.parametrize(("tp", "pp"), [(3, 1), (1, 2), (3, 2)])
def test_bundled_model_matches_one_device(tp: int, pp: int) -> None:
    """SmolLM2-135M: 9 query heads, 3 KV heads, 30 layers, tied embeddings, a 49152-token vocabulary."""
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = _reference_tokens("smollm2-135m-instruct", PROMPTS, params, num_blocks=5)  # 5: still preempts
    got, _ = _generate("smollm2-135m-instruct", PROMPTS, params, num_blocks=5, tensor_parallel_size=tp,
                       pipeline_parallel_size=pp)
    assert got == expected


@pytest.mark.parametrize(("model", "kwargs", "message"), [
    ("smollm2-135m-instruct", {"tensor_parallel_size": 2},
     "tensor_parallel_size=2 does not divide the model's 9 attention heads"),
    ("smollm2-135m-instruct", {"tensor_parallel_size": 6},
     "tensor_parallel_size=6 does not divide the model's 9 attention heads"),
    ("tiny-llama", {"tensor_parallel_size": 3}, "tensor_parallel_size=3 does not divide the model's 4 attention heads"),
    ("tiny-llama", {"pipeline_parallel_size": 3}, "pipeline_parallel_size=3 exceeds the model's 2 layers"),
    ("tiny-llama", {"pipeline_parallel_size": 2, "connector": "shared-fs"}, "cannot be combined with pipeline"),
    ("tiny-llama", {"tensor_parallel_size": 2, "connector": "mypkg.kv:factory"},
     "'mypkg.kv:factory' cannot run with tensor_parallel_size > 1"),
    ("tiny-llama", {"tensor_parallel_size": 2, "async_scheduling": True}, "async_scheduling cannot be used"),
])
def test_layouts_the_model_cannot_take_are_refused_before_any_worker_starts(tiny, model, kwargs, message) -> None:
    model = tiny["llama"] if model == "tiny-llama" else model
    with pytest.raises(ValueError, match=message):
        EngineConfig.create(model, device="cpu", **kwargs)
