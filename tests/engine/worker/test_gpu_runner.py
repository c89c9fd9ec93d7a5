"""The model runner on a CUDA GPU (skipped without one): parity with transformers, dummy 8B load, KV sizing."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.model_runner import ModelRunner
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_on_gpu_matches_transformers(arch: str, backend: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(arch, tmp_path)
    runner = ModelRunner(EngineConfig.create(model_dir, device="cuda", dtype="float32", num_blocks=64,
                                             block_size=16, attention_backend=backend))
    assert runner.attn_backend.name == backend
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    tokens = torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = [9, 4, 33, 1, 60]
    out1 = runner.execute_model(SchedulerOutput([ScheduledChunk("a", tokens[:40], 0, blocks, True)]))
    out2 = runner.execute_model(SchedulerOutput([ScheduledChunk("a", tokens[40:69], 40, blocks, True)]))
    out3 = runner.execute_model(SchedulerOutput([ScheduledChunk("a", tokens[69:], 69, blocks, True)]))
    with torch.inference_mode():
        want = ref(torch.tensor([tokens], device="cuda")).logits[0]
    for got, pos in ((out1, 39), (out2, 68), (out3, 69)):
        torch.testing.assert_close(got[0], want[pos], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("preset", ["llama-3.1-8b", "qwen3-8b"])
def test_dummy_8b_loads_fast_and_sizes_kv_from_gpu_memory(preset: str, backend: str) -> None:
    start = time.perf_counter()
    runner = ModelRunner(EngineConfig.create(preset, load_format="dummy", device="cuda",
                                             gpu_memory_utilization=0.8, attention_backend=backend))
    load_s = time.perf_counter() - start
    assert runner.dtype == torch.bfloat16 and runner.num_blocks > 1000
    total = torch.cuda.get_device_properties(0).total_memory
    assert torch.cuda.memory_allocated() <= 0.8 * total + (1 << 30)
    # A mixed step: 64 decode rows, then a 1024-token prefill.
    bs = runner.block_size
    chunks = [ScheduledChunk(f"d{i}", [5], 100, list(range(i * 8, i * 8 + 8)), True) for i in range(64)]
    chunks.append(ScheduledChunk("p", list(range(3, 1027)), 0, list(range(600, 600 + 1024 // bs)), True))
    logits = runner.execute_model(SchedulerOutput(chunks))
    torch.cuda.synchronize()
    start = time.perf_counter()
    logits = runner.execute_model(SchedulerOutput(chunks))
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3
    assert logits.shape == (65, runner.vocab_size) and torch.isfinite(logits).all()
    print(f"\n{preset} ({runner.attn_backend.name}): runner ready in {load_s:.1f}s, {runner.num_blocks} KV blocks, "
          f"mixed step (64 decodes at 101 tokens + a 1024-token prefill) {step_ms:.1f} ms")
    del runner, logits
    gc.collect()
    torch.cuda.empty_cache()
