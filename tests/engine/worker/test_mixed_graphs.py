"""Mixed-step CUDA graphs (steps with prompt chunks): the ladder, which steps a graph holds, the packed layout
(exact), and a padded mixed step against the plain eager step, placeholders included.

On CPU the runner captures nothing and runs the model eagerly on its padded buffers (Triton kernels through the
interpreter), which checks the layout and the KV writes; on a GPU the same test replays real graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.engine.core.sched_output import PLACEHOLDER_TOKEN_ID as P
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.prompt_logprobs import PromptLogprobsTask
from pdserve.engine.worker.block_table_rows import BlockTableRows
from pdserve.engine.worker.input_batch import SampledTokens
from pdserve.engine.worker.mixed_graphs import MixedGraphRunner, mixed_capture_sizes, mixed_graph_top
from pdserve.engine.worker.packed_layout import fill_packed_layout
from tests.helpers.graph_steps import (attach_decode_graphs, each_step_from, prefilled_runner, restore,
                                      snapshot, wiring_runner)


def test_token_ladder_tops_out_at_the_step_budget() -> None:
    assert mixed_capture_sizes(8192) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536,
                                         2048]
    assert mixed_capture_sizes(200) == [16, 32, 48, 64, 96, 128, 192, 200]
    assert mixed_capture_sizes(64) == [16, 32, 48, 64]
    assert mixed_capture_sizes(10) == [10]
    # Another top (PDSERVE_MIXED_CUDA_GRAPHS=N) keeps the same at-most-33 % steps.
    assert mixed_capture_sizes(8192, 4096)[-4:] == [2048, 2560, 3072, 4096]
    assert mixed_capture_sizes(8192, 512)[-2:] == [384, 512]
    assert mixed_capture_sizes(1500)[-2:] == [1280, 1500]


def test_the_environment_setting_names_the_top() -> None:
    assert [mixed_graph_top(v) for v in ("0", "1", "512")] == [0, 2048, 512]
    for bad in ("on", "-4"):
        with pytest.raises(ValueError, match="PDSERVE_MIXED_CUDA_GRAPHS"):
            mixed_graph_top(bad)


def _runner_stub(sizes: list[int], max_num_seqs: int) -> MixedGraphRunner:
    rows = BlockTableRows(8, 4, torch.device("cpu"))
    return MixedGraphRunner(torch.nn.Identity(), [], rows, sizes=sizes, max_num_seqs=max_num_seqs,
                            max_model_len=64, block_size=16, num_blocks=8, device=torch.device("cpu"))


def test_which_steps_a_mixed_graph_holds() -> None:
    graphs = _runner_stub([16, 32, 64], max_num_seqs=4)
    prefill = ScheduledChunk("p", list(range(20)), 0, [0, 1], True)
    decode = ScheduledChunk("d", [5], 9, [2], True)
    assert graphs.padded_size([prefill]) == 32
    assert graphs.padded_size([decode, prefill]) == 32  # 21 tokens
    assert graphs.padded_size([ScheduledChunk("p", list(range(16)), 32, [0, 1, 2], False)]) == 16
    assert graphs.padded_size([ScheduledChunk("p", list(range(65)), 0, [0] * 5, True)]) is None  # above the top
    assert graphs.padded_size([decode] * 5) is None  # more chunks than a step may hold
    assert graphs.padded_size([]) is None
    assert [graphs.num_seqs(s) for s in (16, 32, 64)] == [4, 4, 4]
    assert _runner_stub([16, 32], max_num_seqs=256).num_seqs(16) == 16


def test_packed_layout_of_a_mixed_step() -> None:
    rows, seqs, bs = 16, 4, 4
    chunks = [ScheduledChunk("d", [7], 5, [3, 6], True),  # a decode at position 5: block 6, slot 25
              ScheduledChunk("p", [11, 12, 13, 14, 15], 2, [1, 9], False),  # a middle chunk over a cached prefix
              ScheduledChunk("q", [21, 22], 0, [2], True)]
    arrays = dict(ids=np.full(rows, 99), positions=np.full(rows, 99), slots=np.full(rows, 99),
                  query_start_loc=np.full(seqs + 1, 99), seq_lens=np.full(seqs, 99),
                  context_lens=np.full(seqs, 99), logits_rows=np.full(rows, 99))
    n = fill_packed_layout(chunks, seqs, rows, bs, **arrays)
    assert n == 2  # the unsampled middle chunk has no logits row
    assert arrays["ids"].tolist() == [7, 11, 12, 13, 14, 15, 21, 22] + [0] * 8
    assert arrays["positions"].tolist() == [5, 2, 3, 4, 5, 6, 0, 1] + [0] * 8
    assert arrays["slots"].tolist() == [25, 6, 7, 36, 37, 38, 8, 9] + [-1] * 8
    assert arrays["query_start_loc"].tolist() == [0, 1, 6, 8, 8]
    assert arrays["seq_lens"].tolist() == [6, 7, 2, 0]
    assert arrays["context_lens"].tolist() == [5, 2, 0, 0]
    assert arrays["logits_rows"][:n].tolist() == [0, 7]
    with pytest.raises(ValueError, match="do not fit"):
        fill_packed_layout(chunks, 2, rows, bs, **arrays)


def test_padded_mixed_step_matches_eager_step(tmp_path) -> None:
    tables = {"a": [5, 9], "b": [1, 12], "c": [20, 3, 11], "n": [7, 8]}
    runner, g = prefilled_runner(tmp_path, tables)
    new = torch.randint(3, 500, (23,), generator=g).tolist()

    def step(a_token: int, c_token: int) -> list[ScheduledChunk]:
        return [ScheduledChunk("a", [a_token], 20, tables["a"], True),  # decodes
                ScheduledChunk("c", [c_token], 30, tables["c"], True),
                ScheduledChunk("b", [40, 41, 42], 14, tables["b"], True),  # continues its prompt past block 1
                ScheduledChunk("n", new, 0, tables["n"], False)]  # a new prompt's first chunk, not sampled

    cache_before = snapshot(runner.kv_caches)
    want = runner.execute_model(SchedulerOutput(step(7, 8)))  # eager (enforce_eager)
    cache_eager = snapshot(runner.kv_caches)
    restore(runner.kv_caches, cache_before)

    graphs = MixedGraphRunner(runner.model, runner.kv_caches, BlockTableRows(16, 512 // 16, runner.device),
                              sizes=[16, 32, 48], max_num_seqs=8, max_model_len=512, block_size=16,
                              num_blocks=24, device=runner.device)
    graphs.capture()
    chunks = step(P, P)  # both decodes' tokens are placeholders for what the step before sampled
    size = graphs.padded_size(chunks)
    assert size == 32  # 28 live tokens, 4 padding rows; 4 live sequences, 4 padding ones
    sampled = SampledTokens({"c": 0, "z": 1, "a": 2}, torch.tensor([8, 99, 7], device=runner.device))
    with torch.inference_mode():
        hidden, rows, num_tokens = graphs.run(chunks, size, sampled)
        assert hidden.shape[0] == 32 and num_tokens == 28
        got = runner.model.compute_logits(hidden.index_select(0, rows)).float()
    assert rows.tolist() == [0, 1, 4]
    assert got.shape == want.shape == (3, runner.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert graphs._meta[:2].tolist() == [7, 8]  # the placeholders were filled on the device
    # Padding rows (slot -1) wrote nothing: the cache equals the eager step's.
    for c, ref in zip(runner.kv_caches, cache_eager):
        torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-5)
    assert graphs.num_replays == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU wiring (the Triton kernels in the interpreter); on a "
                    "GPU, test_gpu_graphs.py covers the runner")
def test_model_runner_routes_prompt_steps_to_the_mixed_graphs(tmp_path, monkeypatch) -> None:
    """The runner's wiring, on CPU: graph runners built as on a GPU (capture is a no-op here) take a step with a
    prompt chunk; a step wanting prompt logprobs, or one too big for the ladder, runs eagerly; the logits equal
    the eager step's."""
    runner = wiring_runner(tmp_path, max_num_batched_tokens=32)
    assert runner.mixed_graph_runner is None  # CPU: eager
    steps = [[ScheduledChunk("a", list(range(3, 21)), 0, [4, 7], True)],  # 18 tokens: the 32 graph
             [ScheduledChunk("a", list(range(3, 36)), 0, [4, 7, 9], True)]]  # 33 tokens: above the ladder
    saved = snapshot(runner.kv_caches)
    want = list(each_step_from(runner, steps, saved))

    attach_decode_graphs(runner)
    runner.mixed_graph_runner = runner._make_mixed_graph_runner()
    assert runner.mixed_graph_runner.sizes == [16, 32]
    for got, ref in zip(each_step_from(runner, steps, saved), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert runner.mixed_graph_runner.num_replays == 1  # the 33-token step ran eagerly
    task = PromptLogprobsTask(num_top=0, start_pos=0, target_ids=list(range(4, 21)))
    runner.execute_model(SchedulerOutput(steps[0], prompt_logprobs={"a": task}))
    assert len(runner.prompt_logprobs_output["a"][1]) == 17
    assert runner.mixed_graph_runner.num_replays == 1  # prompt logprobs: eager
    monkeypatch.setenv("PDSERVE_MIXED_CUDA_GRAPHS", "0")
    assert runner._make_mixed_graph_runner() is None
