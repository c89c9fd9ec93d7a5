"""The speculative-decoding latency benchmark's sweep on CPU: the oracle replays a calibrated reference (a run whose
every token came out of a verify step), so at 100 % every draft is accepted and at 50 % half of them."""

from __future__ import annotations

import torch

from pdserve import LLM
from pdserve.bench.spec_decode import run_sweep
from tests.helpers.tiny_models import make_tiny_model


def test_oracle_sweep_with_calibration(tmp_path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(make_tiny_model("llama", tmp_path), device="cpu", attention_backend="torch", num_blocks=64,
                  speculative_config={"method": "oracle", "num_speculative_tokens": 4})
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 500, (12,), generator=g).tolist() for _ in range(2)]
        results = run_sweep(llm, prompts, output_len=17, iters=1, acceptances=[1.0, 0.5])
    finally:
        torch.set_num_threads(threads)
    base, full, half = results
    assert base.mode == "baseline" and base.acceptance_rate is None and base.greedy_match == 1.0
    assert (full.mode, full.acceptance_rate, full.mean_acceptance_length) == ("oracle@1", 1.0, 5.0)
    assert full.oracle_match == full.greedy_match == 1.0  # float32: the calibration equals the baseline
    assert abs(half.acceptance_rate - 0.5) < 0.05  # exactly 2 of 4, but drafts cut at max_tokens round their own way
    assert half.oracle_match == 1.0
    assert full.verify_graph_steps is None  # no CUDA graphs on CPU


def test_forced_oracle_sweep_needs_no_calibration(tmp_path) -> None:
    """``oracle_forced`` (bf16 timing): the proposer keeps the engine's record of the baseline and its share is
    accepted as asked."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(make_tiny_model("llama", tmp_path), device="cpu", attention_backend="torch", num_blocks=64,
                  speculative_config={"method": "oracle", "num_speculative_tokens": 4, "oracle_forced": True})
        oracle = llm.engine.core.spec.proposer
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 500, (12,), generator=g).tolist() for _ in range(2)]
        base, full, half = run_sweep(llm, prompts, output_len=17, iters=1, acceptances=[1.0, 0.5])
    finally:
        torch.set_num_threads(threads)
    assert llm.engine.core.spec.proposer is oracle  # not replaced by a calibrated one
    assert (full.acceptance_rate, full.mean_acceptance_length) == (1.0, 5.0)
    assert abs(half.acceptance_rate - 0.5) < 0.05


def test_off_baseline_detaches_the_speculative_decoder(tmp_path) -> None:
    """``--spec-baseline off``: the baseline runs the non-speculative engine core's path in the same process (no
    proposer, no verification); the decoder is attached again for the proposer's runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(make_tiny_model("llama", tmp_path), device="cpu", attention_backend="torch", num_blocks=64,
                  speculative_config={"method": "oracle", "num_speculative_tokens": 4, "oracle_forced": True})
        spec = llm.engine.core.spec
        seen = []
        verify = spec.verify
        spec.verify = lambda *a, **kw: seen.append(llm.engine.core.spec) or verify(*a, **kw)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 500, (12,), generator=g).tolist() for _ in range(2)]
        off, full = run_sweep(llm, prompts, output_len=17, iters=1, acceptances=[1.0], baseline="off")
    finally:
        torch.set_num_threads(threads)
    assert llm.engine.core.spec is spec and seen and all(s is spec for s in seen)
    assert (off.mode, off.acceptance_rate, off.greedy_match, off.speedup) == ("off", None, 1.0, 1.0)
    assert (full.acceptance_rate, full.mean_acceptance_length) == (1.0, 5.0)
