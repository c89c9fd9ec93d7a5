"""Our models give transformers' logits (float32) on the bundled model and on tiny random Llama / Qwen2 / Qwen3."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.model_loader import load_model, resolve_model
from pdserve.engine.worker.input_batch import build_inputs
from pdserve.engine.worker.kv_cache import allocate_kv_caches, kv_cache_spec
from tests.helpers.tiny_models import make_tiny_model

BLOCK = 16


def ours_and_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    r = resolve_model(model_dir, "auto")
    cfg = ModelConfig(model=model_dir, path=r.path, hf_config=r.hf_config)
    ours = load_model(cfg, "cpu", "float32")
    ref = AutoModelForCausalLM.from_pretrained(r.path, dtype=torch.float32).eval()
    return ours, ref, r.hf_config


@torch.inference_mode()
def full_logits(model, hf_config, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All-position logits of each prompt, run as one flattened batch (one prefill chunk per prompt)."""
    blocks_per = [(len(p) + BLOCK - 1) // BLOCK for p in prompts]
    caches = allocate_kv_caches(kv_cache_spec(hf_config, BLOCK, torch.float32), sum(blocks_per), torch.device("cpu"))
    chunks, first = [], 0
    for i, (p, n) in enumerate(zip(prompts, blocks_per)):
        chunks.append(ScheduledChunk(f"r{i}", p, 0, list(range(first, first + n)), True))
        first += n
    batch = build_inputs(SchedulerOutput(chunks=chunks), BLOCK, torch.device("cpu"))
    hidden = model(batch.input_ids, batch.positions, caches, batch.attn_metadata)  # [T, D]
    logits = model.compute_logits(hidden)
    return list(logits.split([len(p) for p in prompts]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_matches_transformers(arch: str, tmp_path) -> None:
    ours, ref, hf_config = ours_and_hf(make_tiny_model(arch, tmp_path))
    g = torch.Generator().manual_seed(0)
    # Long enough to reach the rope-scaled frequencies of the tiny Llama (original context 64).
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (150, 9, 1)]
    for p, got in zip(prompts, full_logits(ours, hf_config, prompts)):
        with torch.inference_mode():
            want = ref(torch.tensor([p])).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bundled_model_matches_transformers() -> None:
    path = resolve_model("smollm2-135m-instruct", "auto").path
    ours, ref, hf_config = ours_and_hf(path)
    prompts = [list(range(200, 232))]  # one prompt: transformers' first forward on 2 cores costs seconds
    for p, got in zip(prompts, full_logits(ours, hf_config, prompts)):
        with torch.inference_mode():
            want = ref(torch.tensor([p])).logits[0]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
