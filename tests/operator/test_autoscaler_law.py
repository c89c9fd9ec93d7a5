"""The autoscaler's control law (operator/autoscaler.py), table-driven and exact."""

from __future__ import annotations

import dataclasses

import pytest
from pdserve.operator.autoscaler import AutoscalerState, AutoscalingPolicy, Observation, decide

POLICY = AutoscalingPolicy(ttft_target_s=1.0, itl_target_s=0.05, min_prefill=1, max_prefill=20, min_decode=1,
                           max_decode=20, scale_down_window_s=300, tolerance=0.0)


def obs(**kw) -> Observation:
    base = dict(window_s=10.0, prefill_pods=2, decode_pods=2, arrived_prompt_tokens=0.0, queued_prompt_tokens=0.0,
                prefill_computed_tokens=0.0, prefill_busy_s=0.0, ttft_p=None, decode_sequences=0.0, itl_p=None)
    base.update(kw)
    return Observation(**base)


# name, observation, (prefill, decode)
CASES = [
    # 10k tok/s arrive, a pod computes 5k tok/s busy: 10000 / (5000 * 0.7) = 2.86 -> 3; TTFT on target
    ("prefill sized by demand over capacity x headroom",
     obs(arrived_prompt_tokens=100_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0, ttft_p=0.8), (3, 2)),
    # the same, with a backlog of 50k tokens: (100k + 50k) / 10 s / 3500 = 4.29 -> 5
    ("a backlog counts as demand",
     obs(arrived_prompt_tokens=100_000, queued_prompt_tokens=50_000, prefill_computed_tokens=25_000,
         prefill_busy_s=5.0, ttft_p=0.8), (5, 2)),
    # TTFT over target: headroom 0.7 -> 0.595: 10000 / (5000 * 0.595) = 3.36 -> 4
    ("TTFT over target shrinks the headroom",
     obs(arrived_prompt_tokens=100_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0, ttft_p=1.5), (4, 2)),
    # decode: ITL = 0.01 + 0.001 * batch from two pods at batch 10 and 30; b* = (0.05*0.9 - 0.01)/0.001 = 35;
    # 100 sequences / 35 = 2.86 -> 3
    ("decode sized by the fitted ITL line",
     obs(decode_sequences=100, itl_samples=((10, 0.02), (30, 0.04)), itl_p=0.04), (2, 3)),
    # no fit yet (one batch size): proportional to the observed ITL: 2 * 0.09 / 0.045 = 4
    ("decode without a fit follows ITL proportionally",
     obs(decode_sequences=100, itl_samples=((30, 0.09), (30, 0.09)), itl_p=0.09), (2, 4)),
    ("KV memory pressure adds a decode pod", obs(kv_usage=0.95), (2, 3)),
    # 600 sequences and pods of at most 256: 3, however fast the ITL
    ("sequence slots bound the decode count", obs(decode_sequences=600, itl_p=0.01), (2, 3)),
    ("a maximum caps", obs(arrived_prompt_tokens=10_000_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0),
     (20, 2)),
]


@pytest.mark.parametrize("name,observation,expected", CASES, ids=[c[0] for c in CASES])
def test_one_window(name, observation, expected):
    d = decide(POLICY, AutoscalerState(), observation, now=0.0)
    assert (d.prefill, d.decode) == expected, d.reason


def test_budget_is_shared_in_proportion_to_need_and_keeps_minimums():
    policy = dataclasses.replace(POLICY, gpu_budget=10)
    d = decide(policy, AutoscalerState(), obs(arrived_prompt_tokens=280_000, prefill_computed_tokens=25_000,
                                              prefill_busy_s=5.0, decode_sequences=420,
                                              itl_samples=((10, 0.02), (30, 0.04))), now=0.0)
    # wants 8 prefill (28000/3500) and 12 decode (420/35); 20 GPUs asked, 10 given: 4 + 6
    assert (d.wanted_prefill, d.wanted_decode) == (8, 12)
    assert (d.prefill, d.decode, d.budget_limited) == (4, 6, True)
    tight = dataclasses.replace(POLICY, gpu_budget=3, min_prefill=1, min_decode=2)
    d = decide(tight, AutoscalerState(), obs(arrived_prompt_tokens=2_800_000, prefill_computed_tokens=25_000,
                                             prefill_busy_s=5.0), now=0.0)
    assert (d.prefill, d.decode) == (1, 2)


def test_budget_below_the_minimums_is_refused():
    with pytest.raises(ValueError, match="cannot hold the minimum"):
        dataclasses.replace(POLICY, gpu_budget=1, min_prefill=1, min_decode=1)


def test_scale_down_waits_for_the_window_and_never_flaps():
    """Load spikes at t=0 then drops: the count stays up for the whole window, then comes down once."""
    state, pods, counts = AutoscalerState(), 2, []
    high = dict(arrived_prompt_tokens=100_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0, ttft_p=0.8)
    low = dict(arrived_prompt_tokens=10_000, prefill_computed_tokens=10_000, prefill_busy_s=2.0, ttft_p=0.2)
    for t in range(0, 600, 30):
        d = decide(POLICY, state, obs(prefill_pods=pods, **(high if t == 0 else low)), now=float(t))
        pods = d.prefill
        counts.append(pods)
    assert counts[0] == 3
    assert counts[1:10] == [3] * 9  # t = 30 .. 270: inside the 300 s window
    assert counts[10] < 3 and counts[10:] == [counts[10]] * len(counts[10:])  # once down, steady
    changes = sum(1 for a, b in zip(counts, counts[1:]) if a != b)
    assert changes == 1


def test_tolerance_ignores_small_moves():
    policy = dataclasses.replace(POLICY, tolerance=0.2)
    d = decide(policy, AutoscalerState(), obs(prefill_pods=10, arrived_prompt_tokens=385_000,
                                              prefill_computed_tokens=25_000, prefill_busy_s=5.0), now=0.0)
    assert d.wanted_prefill == 11 and d.prefill == 10


def test_colocation_is_recommended_for_short_prompts_at_low_load():
    light = obs(arrived_prompt_tokens=1_000, prefill_computed_tokens=1_000, prefill_busy_s=0.2,
                mean_prompt_tokens=100)
    assert decide(POLICY, AutoscalerState(), light, 0.0).colocate
    long_prompts = dataclasses.replace(light, mean_prompt_tokens=2000)
    assert not decide(POLICY, AutoscalerState(), long_prompts, 0.0).colocate


def test_headroom_is_not_learned_while_new_prefill_pods_start():
    state = AutoscalerState()
    slow = dict(arrived_prompt_tokens=100_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0, ttft_p=5.0)
    assert decide(POLICY, state, obs(prefill_pods=2, **slow), now=0.0).prefill == 4
    assert state.prefill_headroom == pytest.approx(0.595)
    decide(POLICY, state, obs(prefill_pods=2, **slow), now=30.0)  # the 2 new pods are not ready yet
    assert state.prefill_headroom == pytest.approx(0.595)
    decide(POLICY, state, obs(prefill_pods=4, **slow), now=60.0)  # they are, and TTFT still misses
    assert state.prefill_headroom == pytest.approx(0.595 * 0.85)


def test_pods_still_starting_are_kept():
    """Decided 4 with 2 ready; the next window wants 3 with 3 ready: the 4th, still starting, stays."""
    state = AutoscalerState()
    load = dict(arrived_prompt_tokens=100_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0, ttft_p=5.0)
    assert decide(POLICY, state, obs(prefill_pods=2, **load), now=0.0).prefill == 4
    calm = dict(arrived_prompt_tokens=70_000, prefill_computed_tokens=25_000, prefill_busy_s=5.0, ttft_p=0.8)
    d = decide(POLICY, state, obs(prefill_pods=3, **calm), now=10.0)
    assert d.wanted_prefill == 3 and d.prefill == 4  # 7000 / (5000 * 0.595) = 2.35 -> 3


def test_decode_fit_separates_batch_and_context_cost():
    """ITL = 0.005 + 0.0002 * batch + 0.02 * kv_usage, seen at short and at long contexts: sized at the KV usage
    per sequence seen now: long contexts (0.004 of the pool a sequence) need more pods than short ones."""
    state = AutoscalerState()
    samples = tuple((b, 0.005 + 0.0002 * b + 0.02 * b * u, b * u) for b, u in ((10, 0.0005), (40, 0.0005),
                                                                           (10, 0.004), (40, 0.004)))
    short = obs(decode_sequences=400, itl_samples=samples, kv_usage_per_sequence=0.0005)
    d = decide(POLICY, state, short, now=0.0)
    a, cb, cu = state.itl_model()
    assert (a, cb, cu) == pytest.approx((0.005, 0.0002, 0.02))
    # b* = (0.045 - 0.005) / (0.0002 + 0.02 * 0.0005) = 190.5 -> 400 / 190.5 -> 3
    assert d.wanted_decode == 3
    # 1,600 sequences: short contexts 1600 / 190.5 -> 9 pods; long ones b* = 0.04 / 0.00028 = 142.9 -> 12 pods
    more = dataclasses.replace(short, itl_samples=(), decode_sequences=1600)
    assert decide(POLICY, AutoscalerState(fit=list(state.fit)), more, now=10.0).wanted_decode == 9
    long = dataclasses.replace(more, kv_usage_per_sequence=0.004)
    assert decide(POLICY, AutoscalerState(fit=list(state.fit)), long, now=10.0).wanted_decode == 12


def test_decode_fit_without_usage_is_the_batch_line():
    state = AutoscalerState()
    decide(POLICY, state, obs(decode_sequences=100, itl_samples=((10, 0.02), (30, 0.04))), now=0.0)
    assert state.itl_model() == pytest.approx((0.01, 0.001, 0.0))
    assert state.itl_line() == pytest.approx((0.01, 0.001))


def test_headroom_is_not_shrunk_while_a_backlog_explains_the_miss():
    state = AutoscalerState()
    backlog = dict(arrived_prompt_tokens=100_000, queued_prompt_tokens=60_000, prefill_computed_tokens=25_000,
                   prefill_busy_s=5.0, ttft_p=5.0)
    d = decide(POLICY, state, obs(prefill_pods=2, **backlog), now=0.0)
    assert state.prefill_headroom == pytest.approx(0.7)
    assert d.prefill == 5  # (100k + 60k) / 10 s / (5000 * 0.7) = 4.57 -> 5: the backlog term asks for the pods
