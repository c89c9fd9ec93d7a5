"""Prompt logprobs (SamplingParams.prompt_logprobs) equal transformers' float32 log-softmax of the same model,
whole or in chunks, on a cold cache or with the prompt already cached, and cost nothing for other requests."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model

PROMPT = [(i * 7919) % 500 + 3 for i in range(70)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("plp") / "m")


@pytest.fixture(scope="module")
def reference(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row i predicts token i + 1


def _check(out, reference: torch.Tensor, k: int) -> None:
    rows = out.prompt_logprobs
    assert rows is not None and len(rows) == len(PROMPT) and rows[0] is None
    for i, row in enumerate(rows[1:]):
        ref = reference[i]
        token = PROMPT[i + 1]
        assert row[0].token_id == token
        assert math.isclose(row[0].logprob, ref[token].item(), abs_tol=1e-4)
        assert row[0].rank == int((ref > ref[token]).sum()) + 1
        top_vals, top_ids = ref.topk(k)
        assert [lp.token_id for lp in row[1:]] == top_ids.tolist()
        assert all(math.isclose(lp.logprob, v, abs_tol=1e-4) for lp, v in zip(row[1:], top_vals.tolist()))


@pytest.mark.parametrize("chunk, async_scheduling", [(None, False), (16, False), (7, False), (7, True)])
def test_prompt_logprobs_match_transformers(model_dir, reference, chunk, async_scheduling) -> None:
    extra = {"max_num_batched_tokens": chunk, "max_num_seqs": 4} if chunk else {}
    llm = LLM(model_dir, block_size=16, async_scheduling=async_scheduling, **extra)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))[0]
    _check(out, reference, 3)
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_prefix_cache_hit_is_recomputed(model_dir, reference) -> None:
    llm = LLM(model_dir, block_size=16)
    core = llm.engine.core
    llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))  # fills the prefix cache
    warm = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))[0]
    assert warm.num_cached_tokens == 64  # a plain request does hit the cache
    before = core.num_computed_tokens_total
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    assert core.num_computed_tokens_total - before == len(PROMPT)  # the whole prompt ran again
    assert out.num_cached_tokens == 0
    _check(out, reference, 0)


def test_one_token_prompt_and_bounds(model_dir) -> None:
    llm = LLM(model_dir)
    out = llm.generate([[5]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
