"""End-to-end: greedy outputs of the engine equal transformers' ``generate`` token for token.

On the bundled SmolLM2 (a batch of prompts of different lengths) and on tiny random Llama / Qwen2 / Qwen3
models, under the configurations that stress the scheduler: a tiny per-step token budget (chunked prefill),
prefix caching on and off, and a KV pool so small that requests get preempted and recomputed.
"""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "Explain in one sentence why the sky is blue, and then say what colour the sunset is and why it differs.",
    "def fibonacci(n):",
    "Hello",
    "Translate to French: I like green apples and red cherries very much.",
    "Once upon a time in a small village by the mountains there lived an old clockmaker who",
]


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy ``generate``, one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
            outs.append(gen[0, len(p):].tolist())
    return outs


def engine_greedy(llm: LLM, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def bundled_llm() -> LLM:
    return LLM("smollm2-135m-instruct", max_model_len=512)


def test_bundled_model_matches_transformers(bundled_llm: LLM) -> None:
    tok = bundled_llm.get_tokenizer()
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) >= 6, "prompts should have different lengths"
    ours = engine_greedy(bundled_llm, prompts, 16)
    ref = hf_greedy(bundled_llm.config.model.path, prompts, 16)
    assert ours == ref


TINY_CONFIGS = {
    "default": {},
    "chunked-16": {"max_num_batched_tokens": 16},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "preemption": {"num_blocks": 14, "block_size": 4, "max_num_batched_tokens": 32},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(arch: str, tmp_path) -> None:
    model_dir = make_tiny_model(arch, tmp_path / arch)
    g = torch.Generator().manual_seed(1)
    # Two prompts share a 24-token prefix so the prefix cache has something to hit.
    shared = torch.randint(3, 200, (24,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 200, (n,), generator=g).tolist() for n in (1, 9, 17)]
    prompts += [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 40)]
    ref = hf_greedy(str(model_dir), prompts, 12)
    for name, kwargs in TINY_CONFIGS.items():
        llm = LLM(str(model_dir), **kwargs)
        assert engine_greedy(llm, prompts, 12) == ref, f"{arch} / {name}"
        if name == "preemption":
            assert llm.engine.core.get_stats().num_preemptions > 0, "the small pool should force preemption"
