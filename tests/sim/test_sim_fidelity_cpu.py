"""Issue 18, acceptance 1 on the CPU: the simulator reproduces the real engine's mean TTFT and ITL within 15 %.

The bundled model runs a trace in wall time through the real engine core (arrivals at their times, each token
stamped as its step returns); the cost model is fitted to the steps that very run recorded; the simulator
replays the same trace with that profile; mean TTFT and mean ITL must agree within 15 %. A profile with doubled
coefficients must miss by more than that.

Made for a small shared CPU, where a step's time varies a lot from one step to the next under other jobs:

- torch uses one thread, so the engine does not fight the other jobs (and itself) for the second core;
- the profile is fitted to the steps of the measured run, so whatever the machine's load did to the steps
  is in the profile, and the kinds of steps (prompt chunks with decodes, decode batches) are the trace's own;
- the trace's rate is set from a short calibration so that the engine is busy about half the time whatever
  the machine's speed: queueing stays moderate instead of turning a slow machine into an overloaded one;
- means over 30 requests of some 16 tokens each, with prompts of 100-300 tokens, so that each step computes
  enough for its fixed overheads and noise to average out.

What this checks is the simulator's scheduling and queueing (chunked prefill mixed with decodes, batching,
waiting), from the cost of the steps; the GPU table of docs/autoscaling.md checks a profile fitted elsewhere.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pdserve.sim import fidelity
from pdserve.sim.workload import Phase, generate

MODEL = "smollm2-135m-instruct"
LIMITS = dict(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=1024)
NUM_REQUESTS = 30
UTILIZATION = 0.5


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trace(rate: float, vocab: int, seed: int = 7):
    phase = Phase(NUM_REQUESTS / rate, rate, (100, 300), (8, 24))
    return generate([phase], vocab_size=vocab, seed=seed)


def test_simulated_ttft_and_itl_within_15_percent_of_the_engine_on_cpu(one_thread):
    from pdserve.engine.llm import LLM

    llm = LLM(MODEL, device="cpu", attention_backend="torch", num_blocks=1024, **LIMITS)
    core, hf = llm.engine.core, llm.config.model.hf_config
    manager = core.scheduler.kv_cache_manager
    shape = dict(name="cpu", model=MODEL, gpu="cpu", kv_bytes_per_token=1, num_blocks=manager.num_blocks,
                 block_size=manager.block_size)
    # A short calibration (it also warms the engine up) sets the rate for about half utilization.
    calibrated = fidelity.fit_profile(fidelity.calibrate(core, hf.vocab_size, prompt_lens=(100, 300),
                                                         decode_batches=(1, 8), decode_tokens=8), **shape)
    probe = _trace(1.0, hf.vocab_size)
    rate = UTILIZATION / fidelity.busy_s_per_request(calibrated, probe, model=MODEL, **LIMITS)
    trace = _trace(rate, hf.vocab_size)

    real, steps = fidelity.replay_real_with_steps(core, trace)
    profile = fidelity.fit_profile(steps, **shape)
    sim = fidelity.replay_sim(profile, trace, model=MODEL, **LIMITS)
    ttft_err = fidelity.relative_error(sim.mean_ttft_s, real.mean_ttft_s)
    itl_err = fidelity.relative_error(sim.mean_itl_s, real.mean_itl_s)
    summary = (f"rate {rate:.2f}/s, {len(steps)} steps; profile {profile.base_ms:.2f} ms + "
               f"{profile.per_token_ms:.4f}/token + {profile.per_context_ms:.2e}/context; TTFT measured "
               f"{real.mean_ttft_s * 1e3:.1f} ms, simulated {sim.mean_ttft_s * 1e3:.1f} ms ({ttft_err:.1%}); ITL "
               f"measured {real.mean_itl_s * 1e3:.1f} ms, simulated {sim.mean_itl_s * 1e3:.1f} ms ({itl_err:.1%})")
    print(summary)
    assert ttft_err <= 0.15 and itl_err <= 0.15, summary

    # The comparison can fail: a profile with every coefficient doubled misses both by far more than 15 %.
    doubled = dataclasses.replace(profile, base_ms=2 * profile.base_ms, per_token_ms=2 * profile.per_token_ms,
                                  per_context_ms=2 * profile.per_context_ms)
    wrong = fidelity.replay_sim(doubled, trace, model=MODEL, **LIMITS)
    assert fidelity.relative_error(wrong.mean_ttft_s, real.mean_ttft_s) > 0.15, summary
    assert fidelity.relative_error(wrong.mean_itl_s, real.mean_itl_s) > 0.15, summary
