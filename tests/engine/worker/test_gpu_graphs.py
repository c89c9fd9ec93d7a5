"""On a CUDA GPU (skipped without one): greedy outputs of the Triton path with decode CUDA graphs equal the
eager Triton path, the torch path and transformers, token for token, on tiny models in float32; and a bf16
model produces finite logits through the graphs at every ladder size."""

from __future__ import annotations

import gc

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.model_runner import ModelRunner
from tests.engine.test_llm_parity import hf_greedy
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

VARIANTS = {
    "triton+graphs": dict(attention_backend="triton"),
    "triton eager": dict(attention_backend="triton", enforce_eager=True),
    "torch": dict(attention_backend="torch"),
    "graphs, tiny budget": dict(attention_backend="triton", max_num_batched_tokens=16),
}


def _greedy(model_dir: str, prompts: list[list[int]], max_new: int, **kwargs) -> list[list[int]]:
    llm = LLM(model_dir, device="cuda", dtype="float32", max_num_seqs=8, gpu_memory_utilization=0.3, **kwargs)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_new, temperature=0.0))  # stops at EOS, like HF
    tokens = [o.outputs[0].token_ids for o in outs]
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_graph_path_matches_eager_torch_and_transformers(arch: str, tmp_path) -> None:
    model_dir = make_tiny_model(arch, tmp_path / arch)
    g = torch.Generator().manual_seed(2)
    # Five prompts: decode batches of 5, 4, ... rows pad up to the 8- and 4-row graphs as requests finish.
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (3, 17, 40, 9, 70)]
    max_new = 24
    outs = {name: _greedy(model_dir, prompts, max_new, **kw) for name, kw in VARIANTS.items()}
    ref = hf_greedy(model_dir, prompts, max_new)
    for name, got in outs.items():
        assert got == ref, f"{arch}: {name} differs from transformers"


def test_bf16_graphs_every_ladder_size(tmp_path) -> None:
    model_dir = make_tiny_model("qwen3", tmp_path)
    runner = ModelRunner(EngineConfig.create(model_dir, device="cuda", num_blocks=256, max_num_seqs=40))
    graphs = runner.graph_runner
    assert runner.dtype == torch.bfloat16 and graphs is not None and graphs.sizes == [1, 2, 4, 8, 16, 32, 40]
    for b in (1, 3, 8, 17, 40):
        # Positions 20..39 fit the three 16-token blocks of each request.
        chunks = [ScheduledChunk(f"r{i}", [5 + i], 20 + i % 20, [i * 4, i * 4 + 1, i * 4 + 2], True)
                  for i in range(b)]
        logits = runner.execute_model(SchedulerOutput(chunks))
        eager = runner._run(SchedulerOutput(chunks), runner.kv_caches)
        assert logits.shape == (b, runner.vocab_size) and torch.isfinite(logits).all()
        torch.testing.assert_close(logits, eager, rtol=2e-2, atol=2e-2)


def test_bf16_mixed_graphs_every_ladder_size(tmp_path) -> None:
    """Steps with a prompt chunk (and decode rows beside it) replay the mixed-step graphs; their logits match the
    eager step's."""
    model_dir = make_tiny_model("llama", tmp_path)
    runner = ModelRunner(EngineConfig.create(model_dir, device="cuda", num_blocks=256, max_num_seqs=40,
                                             max_num_batched_tokens=512))
    mixed = runner.mixed_graph_runner
    assert mixed is not None and mixed.sizes == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    for decodes, prompt_len in ((0, 5), (3, 13), (1, 16), (8, 93), (20, 300), (0, 512), (39, 400)):
        chunks = [ScheduledChunk(f"d{i}", [5 + i], 20, [100 + 2 * i, 101 + 2 * i], True) for i in range(decodes)]
        prompt = [7 + i % 500 for i in range(prompt_len)]  # within the tiny vocabulary
        chunks.append(ScheduledChunk("p", prompt, 0, list(range(-(-prompt_len // 16))), True))
        before = mixed.num_replays
        logits = runner.execute_model(SchedulerOutput(chunks))
        assert mixed.num_replays == before + 1, (decodes, prompt_len)
        eager = runner._run(SchedulerOutput(chunks), runner.kv_caches)
        assert logits.shape == (decodes + 1, runner.vocab_size) and torch.isfinite(logits).all()
        torch.testing.assert_close(logits, eager, rtol=2e-2, atol=2e-2)
