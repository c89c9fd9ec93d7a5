"""The decode graph runner: its batch ladder, and its padded static-buffer step against the plain eager step.

On CPU the runner captures nothing and runs the model eagerly on its padded buffers (Triton kernels through the
interpreter), which checks the padding layout; the ``gpu`` tests replay real CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.cuda_graphs import DecodeGraphRunner, capture_sizes
from pdserve.engine.worker.model_runner import ModelRunner
from tests.helpers.tiny_models import make_tiny_model


def test_capture_sizes_ladder() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert capture_sizes(100)[-2:] == [96, 100]
    assert capture_sizes(4096)[-1] == 512


def test_cuda_graph_sizes_option(tmp_path) -> None:
    """``--cuda-graph-sizes`` replaces the ladder (sorted, deduplicated, cut at max_num_seqs); bad lists are
    refused when the config is built."""
    import argparse

    from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs

    assert capture_sizes(64, (32, 8, 8, 128)) == [8, 32]
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    kw = engine_kwargs(parser.parse_args(["--cuda-graph-sizes", "16,4,16", "--max-num-seqs", "32"]))
    model = make_tiny_model("llama", tmp_path / "llama")
    config = EngineConfig.create(**{**kw, "model": model})
    assert config.device.cuda_graph_sizes == (4, 16)
    with pytest.raises(SystemExit):
        parser.parse_args(["--cuda-graph-sizes", "0,4"])
    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        EngineConfig.create(model, cuda_graph_sizes=(1024,))
    with pytest.raises(ValueError, match="none is at most max_num_seqs"):
        EngineConfig.create(model, cuda_graph_sizes=(64,), max_num_seqs=32)


def _prefill_then_decode_chunks(tokens: dict[str, list[int]], tables: dict[str, list[int]], prompt_len: int):
    prefill = [ScheduledChunk(r, t[:prompt_len], 0, tables[r], True) for r, t in tokens.items()]
    decode = [ScheduledChunk(r, t[prompt_len:prompt_len + 1], prompt_len, tables[r], True)
              for r, t in tokens.items()]
    return prefill, decode


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_padded_decode_step_matches_eager_step(arch: str, tmp_path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = make_tiny_model(arch, tmp_path)
    runner = ModelRunner(EngineConfig.create(model_dir, device=device, dtype="float32", num_blocks=24,
                                             block_size=16, attention_backend="triton", max_num_seqs=8,
                                             enforce_eager=True))
    g = torch.Generator().manual_seed(0)
    tokens = {r: torch.randint(3, 500, (21,), generator=g).tolist() for r in "abc"}
    tables = {"a": [5, 9], "b": [1, 17], "c": [20, 3]}
    prefill, decode = _prefill_then_decode_chunks(tokens, tables, 20)
    runner.execute_model(SchedulerOutput(prefill))
    cache_before = [c.clone() for c in runner.kv_caches]
    want = runner.execute_model(SchedulerOutput(decode))  # eager (enforce_eager)
    cache_eager = [c.clone() for c in runner.kv_caches]

    for c, saved in zip(runner.kv_caches, cache_before):
        c.copy_(saved)
    graphs = DecodeGraphRunner(runner.model, runner.kv_caches, max_num_seqs=8, max_model_len=512, block_size=16,
                               num_blocks=24, device=runner.device)
    graphs.capture()
    size = graphs.padded_size(decode)
    assert size == 4  # three live rows, one padding row
    with torch.inference_mode():
        got = runner.model.compute_logits(graphs.run(decode, size)).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The padding row (slot -1) wrote nothing: the cache equals the eager step's.
    for c, ref in zip(runner.kv_caches, cache_eager):
        torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-5)
    assert graphs.padded_size(prefill) is None  # prefill chunks never take the graph path


def test_graph_runner_refuses_bad_block_ids(tmp_path) -> None:
    model_dir = make_tiny_model("llama", tmp_path)
    runner = ModelRunner(EngineConfig.create(model_dir, device="cpu", num_blocks=4, block_size=16,
                                             attention_backend="triton"))
    graphs = DecodeGraphRunner(runner.model, runner.kv_caches, max_num_seqs=2, max_model_len=64, block_size=16,
                               num_blocks=4, device=runner.device)
    with pytest.raises(ValueError, match="outside"):
        graphs.run([ScheduledChunk("a", [3], 5, [4], True)], 1)
    with pytest.raises(ValueError, match="wider"):
        graphs.run([ScheduledChunk("a", [3], 5, [0, 1, 2, 3, 0], True)], 1)


def test_warmup_cases_cross_every_tile_threshold() -> None:
    from pdserve.engine.worker.warmup import warmup_cases

    cases = warmup_cases(group=2, num_kv_heads=8, num_sms=132, max_num_seqs=128, max_query_len=2048)
    assert sorted({q for _, q, _ in cases}) == [1, 8, 16, 32, 33]  # 2, 16, 32, 64 and 66 rows
    assert sorted({s for s, _, _ in cases}) == [1, 9]  # 9 x 8 (sequence, KV head) pairs fill half of 132 SMs
    assert (9, 16, 256) in cases and (1, 1, 0) in cases and (1, 33, 256) not in cases  # no split past 16
    assert all(q <= 16 for _, q, _ in warmup_cases(8, 1, 132, 4, 16))


def test_warm_up_builds_fitting_steps() -> None:
    from pdserve.engine.worker.warmup import warm_up

    seen = []
    warm_up(seen.append, [(2, 3, 20), (1, 1, 0), (64, 1, 256)], block_size=16, num_blocks=8)
    assert len(seen) == 2  # 64 x 17 blocks do not fit in 8
    a, b = seen[0].chunks
    assert (a.start_pos, a.num_tokens, a.block_ids, b.block_ids) == (20, 3, [0, 1], [2, 3])
