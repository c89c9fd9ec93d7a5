"""The autoscaler law's terms for shifting mixes (operator/autoscaler.py): decode sized from what enters it,
the fill of max_tokens, the prefill step cost, and scale-up checks between decisions. Exact numbers."""

from __future__ import annotations

import dataclasses

import pytest
from pdserve.operator.autoscaler import AutoscalerState, AutoscalingPolicy, Observation, decide, decide_scale_up

POLICY = AutoscalingPolicy(ttft_target_s=1.0, itl_target_s=0.05, min_prefill=1, max_prefill=20, min_decode=1,
                           max_decode=20, scale_down_window_s=300, tolerance=0.0, interval_s=30.0,
                           scale_up_interval_s=5.0)
# ITL = 0.01 + 0.001 * batch (two pods at batch 10 and 30): b* = (0.05 * 0.9 - 0.01) / 0.001 = 35 a pod
FIT = ((10, 0.02), (30, 0.04))


def obs(**kw) -> Observation:
    base = dict(window_s=10.0, prefill_pods=2, decode_pods=2, arrived_prompt_tokens=0.0, queued_prompt_tokens=0.0,
                prefill_computed_tokens=0.0, prefill_busy_s=0.0, ttft_p=None, decode_sequences=0.0, itl_p=None)
    base.update(kw)
    return Observation(**base)


def test_decode_is_sized_from_what_enters_it():
    """6,000 output tokens a second enter decode: at ITL 0.045 s, 6000 * 0.045 = 270 sequences decode at once in
    steady state, 35 a pod: 7.7 -> 8 pods, although only 100 sequences decode now (which alone would ask 3)."""
    d = decide(POLICY, AutoscalerState(), obs(decode_sequences=100, itl_samples=FIT, arrived_output_tokens=60_000),
               now=0.0)
    assert d.wanted_decode == 8
    # and once the inflow stops, the sequences still decoding no longer hold pods (only slots would)
    idle = decide(POLICY, AutoscalerState(), obs(decode_sequences=100, itl_samples=FIT, arrived_output_tokens=0.0),
                  now=0.0)
    assert idle.wanted_decode == 1


def test_pods_that_do_not_report_the_inflow_keep_the_sequence_count_law():
    d = decide(POLICY, AutoscalerState(), obs(decode_sequences=100, itl_samples=FIT), now=0.0)
    assert d.wanted_decode == 3  # 100 / 35 = 2.86 -> 3


def test_the_fill_of_max_tokens_is_learned_from_finished_requests():
    """Finished requests generated half their max_tokens: fill 1 -> 0.7 + 0.3 * 0.5 = 0.85; 60,000 * 0.85 / 10 s
    = 5,100 tok/s; 5100 * 0.045 / 35 = 6.56 -> 7 pods."""
    state = AutoscalerState()
    d = decide(POLICY, state, obs(itl_samples=FIT, arrived_output_tokens=60_000, finished_output_tokens=50_000,
                                  finished_max_tokens=100_000), now=0.0)
    assert state.output_fill == pytest.approx(0.85)
    assert d.wanted_decode == 7


def test_prefill_step_cost_separates_fixed_and_per_token_time():
    """busy = 0.015 s a step + 2e-5 s a token, seen with 4,000-token and with 200-token steps: the capacity for a
    new mix of 2,000-token prompts is 2000 / (0.015 + 0.04) = 36,364 tok/s at once (the running average of what
    was computed, 32,632, would size for the old mixes)."""
    state = AutoscalerState()
    for steps, tokens in ((100, 400_000), (500, 100_000)):
        decide(POLICY, state, obs(prefill_computed_tokens=tokens, prefill_busy_s=0.015 * steps + 2e-5 * tokens,
                                  prefill_steps=steps), now=0.0)
    assert state.prefill_cost() == pytest.approx((0.015, 2e-5))
    assert state.prefill_capacity(2000) == pytest.approx(36_363.64, rel=1e-6)
    assert state.prefill_mu == pytest.approx(32_631.58, rel=1e-6)
    # 200,000 tok/s of 2,000-token prompts: 200000 / (36364 * 0.7) = 7.86 -> 8 (with the average: 8.76 -> 9)
    d = decide(POLICY, state, obs(arrived_prompt_tokens=2_000_000, mean_prompt_tokens=2000), now=10.0)
    assert d.wanted_prefill == 8


def test_prefill_step_cost_needs_two_mixes():
    state = AutoscalerState()
    for _ in range(3):  # the same tokens per step every window: fixed and per-token time cannot be told apart
        decide(POLICY, state, obs(prefill_computed_tokens=400_000, prefill_busy_s=9.5, prefill_steps=100), now=0.0)
    assert state.prefill_cost() is None
    assert state.prefill_capacity(2000) == pytest.approx(400_000 / 9.5)


def _decided() -> AutoscalerState:
    """A decision at t=0: mu 5000 tok/s, 10k tok/s arrive: 10000 / (5000 * 0.7) = 2.86 -> 3 prefill pods; 3,000
    output tok/s enter decode: 3000 * 0.045 / 35 = 3.86 -> 4 decode pods."""
    state = AutoscalerState()
    d = decide(POLICY, state, obs(arrived_prompt_tokens=100_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0,
                                  ttft_p=0.8, itl_samples=FIT, decode_sequences=60, arrived_output_tokens=30_000),
               now=0.0)
    assert (d.prefill, d.decode) == (3, 4)
    return state


def test_scale_up_check_raises_a_role_at_once_and_never_lowers():
    state = _decided()
    # 2 s later: 20k tok/s arrive and 30k tokens are queued, drained within the decision interval (30 s):
    # (20000 + 1000) / 3500 = 6 prefill pods; decode: 10,000 tok/s arrive, and the queue's 30,000 prompt tokens
    # will ask 0.5 output tokens each within 30 s: 10500 * 0.045 / 35 = 13.5 -> 14
    check = obs(window_s=2.0, prefill_pods=3, arrived_prompt_tokens=40_000, queued_prompt_tokens=30_000,
                arrived_output_tokens=20_000)
    d = decide_scale_up(POLICY, state, check, now=2.0)
    assert d is not None and (d.prefill, d.decode) == (6, 14)
    assert (state.last_prefill, state.last_decode) == (6, 14)
    # a quiet check changes nothing (scaling down waits for a decision and its window)
    assert decide_scale_up(POLICY, state, obs(window_s=2.0), now=4.0) is None
    # the next decision keeps what the check wanted within the scale-down window
    d = decide(POLICY, state, obs(prefill_pods=6, decode_pods=14, arrived_prompt_tokens=10_000,
                                  prefill_computed_tokens=25_000, prefill_busy_s=5.0), now=30.0)
    assert (d.prefill, d.decode) == (6, 14)


def test_scale_up_check_needs_a_decision_first_and_respects_budget_and_tolerance():
    assert decide_scale_up(POLICY, AutoscalerState(), obs(arrived_prompt_tokens=10**7), now=1.0) is None
    state = _decided()
    tolerant = dataclasses.replace(POLICY, tolerance=0.5)
    # 4 prefill pods wanted against 3 decided: within 50 %, ignored
    assert decide_scale_up(tolerant, state, obs(window_s=2.0, arrived_prompt_tokens=26_000), now=2.0) is None
    budget = dataclasses.replace(POLICY, gpu_budget=8)
    d = decide_scale_up(budget, state, obs(window_s=2.0, arrived_prompt_tokens=40_000, arrived_output_tokens=20_000),
                        now=2.0)
    assert d is not None and d.prefill + d.decode <= 8 and d.budget_limited


def test_scale_up_interval_must_lie_within_the_interval():
    with pytest.raises(ValueError, match="scale-up interval"):
        dataclasses.replace(POLICY, scale_up_interval_s=60.0)


def test_entering_sequences_are_costed_at_their_own_context():
    """ITL = 0.005 + 0.0002 * batch + 0.02 * kv_usage. 100,000 tok/s enter, 500 tokens a sequence after prompts
    of 750, on pools of 10^6 tokens: a sequence holds (750 + 250) / 10^6 = 0.001 of a pool over its life, costs
    0.0002 + 0.02 * 0.001 = 0.00022 s a step; b* = 0.04 / 0.00022 = 181.8; 100000 * 0.045 = 4,500 sequences:
    24.75 -> 25 pods. Costed at the long sequences decoding now (0.004 a sequence): 0.04 / 0.00028 = 142.9 a
    pod, 31.5 -> 32."""
    policy = dataclasses.replace(POLICY, max_decode=100)
    samples = tuple((b, 0.005 + 0.0002 * b + 0.02 * b * u, b * u) for b, u in ((10, 0.0005), (40, 0.0005),
                                                                           (10, 0.004), (40, 0.004)))
    entering = obs(itl_samples=samples, kv_usage_per_sequence=0.004, arrived_output_tokens=1_000_000,
                   mean_output_tokens=500, mean_prompt_tokens=750, kv_capacity_tokens=1_000_000)
    assert decide(policy, AutoscalerState(), entering, now=0.0).wanted_decode == 25
    unknown_pool = dataclasses.replace(entering, kv_capacity_tokens=0.0)
    assert decide(policy, AutoscalerState(), unknown_pool, now=0.0).wanted_decode == 32


def test_without_a_slope_the_inflow_scales_the_itl_rule():
    """Every pod ran batches of 25 (no slope to fit); ITL 0.02 s at 100 sequences on 4 pods; 20,000 tok/s enter:
    steady state 20000 * 0.045 = 900 sequences, ITL taken as proportional to the batch: 4 * 0.02 / 0.045 * 9 = 16."""
    d = decide(POLICY, AutoscalerState(), obs(decode_pods=4, itl_p=0.02, decode_sequences=100,
                                              itl_samples=((25, 0.02),), arrived_output_tokens=200_000), now=0.0)
    assert d.wanted_decode == 16


def test_the_prefill_backlog_counts_as_decode_inflow():
    """200,000 prompt tokens arrived with 50,000 output tokens asked (0.25 a prompt token) in 10 s; 400,000 prompt
    tokens queue on prefill pods: they enter decode within the window too, 100,000 output tokens: (50000 +
    100000) / 10 = 15,000 tok/s; 15000 * 0.045 / 35 = 19.3 -> 20 pods (without the backlog: 6.4 -> 7)."""
    policy = dataclasses.replace(POLICY, max_decode=100, max_prefill=100)
    backlog = obs(itl_samples=FIT, arrived_prompt_tokens=200_000, queued_prompt_tokens=400_000,
                  arrived_output_tokens=50_000)
    assert decide(policy, AutoscalerState(), backlog, now=0.0).wanted_decode == 20
    none = dataclasses.replace(backlog, queued_prompt_tokens=0.0)
    assert decide(policy, AutoscalerState(), none, now=0.0).wanted_decode == 7


def test_a_check_without_a_slope_uses_the_decisions_itl():
    """A check's short window carries no ITL: the last decision's (0.02 s at 100 sequences on 4 pods) scales with
    what enters: 20,000 tok/s, 4 * 0.02 * 20000 / 100 = 16 pods, at once."""
    state = AutoscalerState()
    d = decide(POLICY, state, obs(decode_pods=4, itl_p=0.02, decode_sequences=100, itl_samples=((25, 0.02),),
                                  arrived_output_tokens=10_000), now=0.0)
    assert d.decode == 2  # 1,000 tok/s enter: no doubling; the ITL rule: 4 * 0.02 / 0.045 = 1.8 -> 2
    check = decide_scale_up(POLICY, state, obs(window_s=2.0, decode_pods=4, decode_sequences=100,
                                               arrived_output_tokens=40_000), now=2.0)
    assert check is not None and check.decode == 16
