"""The model runner on hand-made scheduler outputs: chunked prefill, decode, mixed steps, KV cache sizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.input_batch import build_inputs
from pdserve.engine.worker.model_runner import ModelRunner
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_last_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0, -1]


def test_chunked_prefill_then_decode_matches_transformers(model_dir, hf_model) -> None:
    runner = ModelRunner(EngineConfig.create(model_dir, device="cpu", num_blocks=32, block_size=4))
    assert runner.num_blocks == 32 and runner.vocab_size == 512 and runner.device.type == "cpu"
    g = torch.Generator().manual_seed(0)
    a = torch.randint(3, 500, (23,), generator=g).tolist()  # prefilled in two chunks, then decoded
    b = torch.randint(3, 500, (9,), generator=g).tolist()  # prefilled in one chunk, then decoded
    a_blocks, b_blocks = [7, 2, 30, 11, 5, 19, 0], [3, 28, 14, 9]  # scattered on purpose

    def step(*chunks: ScheduledChunk) -> torch.Tensor:
        return runner.execute_model(SchedulerOutput(chunks=list(chunks)))

    # Step 1: a's first chunk (no sample: the prompt goes on) and all of b's prompt but its last 2 tokens.
    out = step(ScheduledChunk("a", a[:10], 0, a_blocks, False), ScheduledChunk("b", b[:7], 0, b_blocks, True))
    assert out.shape == (1, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], hf_last_logits(hf_model, b[:7]), rtol=1e-4, atol=1e-4)
    # Step 2: b decodes one token (decode rows first), a finishes its prompt up to 20 tokens.
    out = step(ScheduledChunk("b", b[7:8], 7, b_blocks, True), ScheduledChunk("a", a[10:20], 10, a_blocks, True))
    torch.testing.assert_close(out[0], hf_last_logits(hf_model, b[:8]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], hf_last_logits(hf_model, a[:20]), rtol=1e-4, atol=1e-4)
    # Steps 3..5: both decode, crossing block boundaries.
    for pos_a, pos_b in ((20, 8), (21, None), (22, None)):
        chunks = [ScheduledChunk("a", a[pos_a:pos_a + 1], pos_a, a_blocks, True)]
        if pos_b is not None:
            chunks.append(ScheduledChunk("b", b[pos_b:pos_b + 1], pos_b, b_blocks, True))
        out = step(*chunks)
        torch.testing.assert_close(out[0], hf_last_logits(hf_model, a[:pos_a + 1]), rtol=1e-4, atol=1e-4)
        if pos_b is not None:
            torch.testing.assert_close(out[1], hf_last_logits(hf_model, b[:pos_b + 1]), rtol=1e-4, atol=1e-4)


def test_block_ids_out_of_range_are_refused(model_dir) -> None:
    runner = ModelRunner(EngineConfig.create(model_dir, device="cpu", num_blocks=4, block_size=4))
    with pytest.raises(ValueError, match="outside"):
        runner.execute_model(SchedulerOutput(chunks=[ScheduledChunk("a", [3, 4], 0, [4], True)]))


def test_cpu_kv_cache_sized_from_budget(model_dir) -> None:
    runner = ModelRunner(EngineConfig.create(model_dir, device="cpu", cpu_kv_cache_bytes=1 << 20, block_size=8))
    # 2 layers x (K, V) x 8 tokens x 2 KV heads x 16 dims x 4 bytes = 4 KiB per block.
    assert runner.kv_spec.bytes_per_block == 4096
    assert runner.num_blocks == 256
    assert len(runner.kv_caches) == 2 and runner.kv_caches[0].shape == (2, 256, 8, 2, 16)
    runner.profile_run()  # the GPU sizing pass also runs on CPU


def test_input_batch_layout() -> None:
    chunks = [ScheduledChunk("d", [5], 6, [3, 1], True),  # decode at position 6 -> block 1, offset 2
              ScheduledChunk("p", [7, 8, 9], 3, [2, 0], False)]  # positions 3, 4, 5 cross into block 0
    batch = build_inputs(SchedulerOutput(chunks=chunks), 4, torch.device("cpu"))
    md = batch.attn_metadata
    assert batch.input_ids.tolist() == [5, 7, 8, 9]
    assert batch.positions.tolist() == [6, 3, 4, 5]
    assert md.slot_mapping.tolist() == [1 * 4 + 2, 2 * 4 + 3, 0 * 4 + 0, 0 * 4 + 1]
    assert md.query_start_loc.tolist() == [0, 1, 4]
    assert md.seq_lens.tolist() == [7, 6] and md.context_lens.tolist() == [6, 3]
    assert md.block_tables.dtype == torch.int32 and md.block_tables.tolist() == [[3, 1], [2, 0]]
    assert md.logits_indices.tolist() == [0]
    assert (md.num_decodes, md.max_query_len, md.max_seq_len) == (1, 3, 7)
    assert np.array_equal(md.query_start_loc_cpu, [0, 1, 4])
