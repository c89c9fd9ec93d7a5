"""Placeholder input tokens (asynchronous scheduling): filled on the device from the previous step's sampled ids,
in the eager inputs and in the decode graph's static buffer."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import PLACEHOLDER_TOKEN_ID as P
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.cuda_graphs import DecodeGraphRunner
from pdserve.engine.worker.input_batch import SampledTokens, build_inputs
from pdserve.engine.worker.model_runner import ModelRunner
from tests.helpers.tiny_models import make_tiny_model


def test_build_inputs_fills_placeholders_from_the_previous_steps_samples() -> None:
    chunks = [ScheduledChunk("a", [P], 6, [3, 1], True), ScheduledChunk("d", [5], 2, [4], True),
              ScheduledChunk("b", [P], 3, [2], True), ScheduledChunk("p", [7, 8, 9], 0, [0], False)]
    prev = SampledTokens({"b": 0, "a": 1, "gone": 2}, torch.tensor([40, 41, 42]))
    batch = build_inputs(SchedulerOutput(chunks=chunks), 4, torch.device("cpu"), sampled=prev)
    assert batch.input_ids.tolist() == [41, 5, 40, 7, 8, 9]
    assert batch.positions.tolist() == [6, 2, 3, 0, 1, 2]
    with pytest.raises(ValueError, match="did not sample"):
        build_inputs(SchedulerOutput(chunks=chunks), 4, torch.device("cpu"), sampled=SampledTokens({"a": 0},
                                                                                                    prev.token_ids))
    with pytest.raises(ValueError, match="placeholder"):
        build_inputs(SchedulerOutput(chunks=chunks), 4, torch.device("cpu"))


def test_graph_runner_fills_placeholders_in_its_static_ids(tmp_path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = ModelRunner(EngineConfig.create(make_tiny_model("qwen3", tmp_path), device=device, dtype="float32",
                                             num_blocks=8, block_size=16, attention_backend="triton",
                                             max_num_seqs=4, enforce_eager=True))
    graphs = DecodeGraphRunner(runner.model, runner.kv_caches, max_num_seqs=4, max_model_len=512, block_size=16,
                               num_blocks=8, device=runner.device)
    graphs.capture()
    prompts = {"a": list(range(3, 13)), "b": list(range(20, 25)), "c": list(range(40, 47))}
    tables = {"a": [5], "b": [1], "c": [6]}
    runner.execute_model(SchedulerOutput([ScheduledChunk(r, t, 0, tables[r], True) for r, t in prompts.items()]))
    cache = [c.clone() for c in runner.kv_caches]
    real = {"a": 100, "b": 200, "c": 300}

    def decode(ids: dict[str, int], sampled=None) -> torch.Tensor:
        for c, saved in zip(runner.kv_caches, cache):
            c.copy_(saved)
        chunks = [ScheduledChunk(r, [ids[r]], len(prompts[r]), tables[r], True) for r in prompts]
        with torch.inference_mode():
            return runner.model.compute_logits(graphs.run(chunks, graphs.padded_size(chunks), sampled)).float()

    want = decode(real)
    prev = SampledTokens({"c": 0, "x": 1, "a": 2}, torch.tensor([300, 7, 100], device=runner.device))
    got = decode({"a": P, "b": 200, "c": P}, prev)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs._meta[:3].tolist() == [100, 200, 300]
