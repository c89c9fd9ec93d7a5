"""Verify-step CUDA graphs: the ladder, which steps a graph covers, the padded layout (exact), and a padded verify
step against the plain eager step.

On CPU the runner captures nothing and runs the model eagerly on its padded buffers (Triton kernels through the
interpreter), which checks the layout and the KV writes; on a GPU the same test replays real graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.block_table_rows import BlockTableRows
from pdserve.engine.worker.cuda_graphs import capture_sizes
from pdserve.engine.worker.verify_graphs import VerifyGraphRunner
from pdserve.engine.worker.verify_layout import fill_verify_layout, verify_capture_sizes, verify_graph_size
from tests.helpers.graph_steps import (attach_decode_graphs, each_step_from, prefilled_runner, restore,
                                      snapshot, wiring_runner)


def test_verify_ladder_stops_at_the_largest_batch_that_can_speculate() -> None:
    ladder = capture_sizes(256)
    assert verify_capture_sizes(ladder, 256, disable_by_batch_size=32) == [1, 2, 4, 8, 16, 32]
    assert verify_capture_sizes(ladder, 256, disable_by_batch_size=17) == [1, 2, 4, 8, 16]
    assert verify_capture_sizes(ladder, 256, disable_by_batch_size=None) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert verify_capture_sizes(capture_sizes(6), 6, disable_by_batch_size=32) == [1, 2, 4, 6]
    assert verify_capture_sizes(capture_sizes(1), 1, disable_by_batch_size=None) == [1]
    assert verify_capture_sizes(ladder, 256, disable_by_batch_size=1) == [1]


def _chunk(rid: str, tokens: list[int], start: int, blocks: list[int], drafts: int, sample: bool = True):
    return ScheduledChunk(rid, tokens, start, blocks, sample, num_draft_tokens=drafts)


def test_which_steps_a_verify_graph_covers() -> None:
    sizes = [1, 2, 4]
    spec = _chunk("a", [5, 6, 7], 10, [0], 2)
    plain = _chunk("b", [8], 3, [1], 0)
    assert verify_graph_size([spec], sizes, 5) == 1
    assert verify_graph_size([spec, plain, plain], sizes, 5) == 4  # a plain decode rides along
    assert verify_graph_size([plain], sizes, 5) is None  # no drafts: the decode graph's step
    assert verify_graph_size([spec] * 5, sizes, 5) is None  # beyond the ladder
    assert verify_graph_size([_chunk("a", [5, 6, 7, 8, 9, 10], 10, [0], 5)], sizes, 5) is None  # more than k
    assert verify_graph_size([spec, _chunk("p", [1, 2, 3], 0, [2], 0)], sizes, 5) is None  # a prefill chunk
    assert verify_graph_size([spec, _chunk("p", [4], 0, [2], 0, sample=False)], sizes, 5) is None
    assert verify_graph_size([_chunk("a", [-1, 6], 10, [0], 1)], sizes, 5) is None  # a placeholder
    assert verify_graph_size([], sizes, 5) is None


def test_layout_packs_live_tokens_and_pads_the_rest() -> None:
    q, size, bs = 3, 4, 4
    chunks = [_chunk("a", [11, 12, 13], 6, [7, 2, 9], 2),  # positions 6, 7, 8: blocks 2, 2, 9
              _chunk("b", [21], 1, [5], 0),
              _chunk("c", [31, 32], 3, [4, 8], 1)]  # positions 3, 4: the draft's slot opens block 8
    t = size * q
    arrays = dict(ids=np.full(t, 99), positions=np.full(t, 99), slots=np.full(t, 99),
                  query_start_loc=np.full(size + 1, 99), seq_lens=np.full(size, 99),
                  context_lens=np.full(size, 99), logits_rows=np.full(t, 99))
    n = fill_verify_layout(chunks, size, q, bs, **arrays)
    assert n == 6
    assert arrays["ids"].tolist() == [11, 12, 13, 21, 31, 32] + [0] * 6
    assert arrays["positions"].tolist() == [6, 7, 8, 1, 3, 4] + [0] * 6
    assert arrays["slots"].tolist() == [10, 11, 36, 21, 19, 32] + [-1] * 6
    assert arrays["query_start_loc"].tolist() == [0, 3, 4, 6, 6]  # the padding sequence has no token
    assert arrays["seq_lens"].tolist() == [9, 2, 5, 0]
    assert arrays["context_lens"].tolist() == [6, 1, 3, 0]
    assert arrays["logits_rows"][:n].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="too short"):
        fill_verify_layout([_chunk("a", [1, 2], 3, [0], 1)], 1, q, bs, **arrays)  # position 4 needs a 2nd block


def test_padded_verify_step_matches_eager_step(tmp_path) -> None:
    tables = {"a": [5, 9], "b": [1], "c": [20, 3, 11]}
    runner, _ = prefilled_runner(tmp_path, tables)
    verify = [_chunk("a", [7, 8, 9, 10, 11], 20, tables["a"], 4),  # k drafts
              _chunk("b", [12], 14, tables["b"], 0),  # a plain decode in the same step
              _chunk("c", [13, 14, 15], 30, tables["c"], 2)]  # its drafts cross into block 11
    cache_before = snapshot(runner.kv_caches)
    want = runner.execute_model(SchedulerOutput(verify))  # eager (enforce_eager)
    cache_eager = snapshot(runner.kv_caches)
    restore(runner.kv_caches, cache_before)

    width = 512 // 16
    graphs = VerifyGraphRunner(runner.model, runner.kv_caches, BlockTableRows(16, width, runner.device),
                               sizes=[1, 2, 4], num_speculative_tokens=4, max_model_len=512, block_size=16,
                               num_blocks=24, device=runner.device)
    graphs.capture()
    size = graphs.padded_size(verify)
    assert size == 4  # three live sequences, one padding sequence
    with torch.inference_mode():
        hidden, rows = graphs.run(verify, size)
        assert hidden.shape[0] == 4 * 5
        got = runner.model.compute_logits(hidden).index_select(0, rows).float()
    assert got.shape == want.shape == (5 + 1 + 3, runner.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Padding rows (slot -1) wrote nothing: the cache equals the eager step's.
    for c, ref in zip(runner.kv_caches, cache_eager):
        torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-5)
    assert graphs.num_replays == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU wiring (the Triton kernels in the interpreter); on a "
                    "GPU, test_gpu_verify_graphs.py covers the runner")
def test_model_runner_routes_verify_steps_to_the_verify_graphs(tmp_path) -> None:
    """The runner's wiring, on CPU: graph runners built as on a GPU (capture is a no-op here) take a verify step,
    a plain decode step goes to the decode graphs, and both give the eager step's logits."""
    runner = wiring_runner(tmp_path, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert runner.graph_runner is None and runner.verify_graph_runner is None  # CPU: eager
    prompt = list(range(3, 21))
    runner.execute_model(SchedulerOutput([ScheduledChunk("a", prompt, 0, [4, 7], True)]))
    steps = [[_chunk("a", [30, 31, 32], 18, [4, 7], 2)], [_chunk("a", [30], 18, [4, 7], 0)]]
    saved = snapshot(runner.kv_caches)
    want = list(each_step_from(runner, steps, saved))

    attach_decode_graphs(runner)
    runner.verify_graph_runner = runner._make_verify_graph_runner()
    assert runner.verify_graph_runner.sizes == [1, 2, 4] and runner.verify_graph_runner.q == 3
    for got, ref in zip(each_step_from(runner, steps, saved), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert runner.verify_graph_runner.num_replays == 1  # the verify step; the decode step took the decode graph
