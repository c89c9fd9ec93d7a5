"""``pdserve sim``'s fast path (lazy decode pods, pure-decode steps fast-forwarded) gives exactly the results of
stepping every pod by events: the same tokens at the same times, the same autoscaler decisions and pod counts."""

from __future__ import annotations

import pytest
from pdserve.operator.autoscaler import AutoscalingPolicy
from pdserve.sim.cluster import Cluster, ClusterConfig
from pdserve.sim.cost_model import load_profile
from pdserve.sim.kv import KVFaults
from pdserve.sim.report import summarize
from pdserve.sim.workload import generate, parse_trace

H100 = load_profile("llama-3.1-8b_h100")
# Prompt-heavy, then decode-heavy: arrivals, handoffs and completions land in the middle of decode runs.
TRACE = "duration=6,rate=12,in=1500:3000,out=5:40;duration=6,rate=25,in=100:300,out=100:300"


def _run(cfg: ClusterConfig) -> tuple[Cluster, dict]:
    cluster = Cluster(cfg)
    requests = cluster.run(generate(parse_trace(TRACE), seed=4))
    return cluster, summarize(requests, cluster, 1.0, 0.012)


def _same(cfg: ClusterConfig) -> Cluster:
    slow, slow_report = _run(ClusterConfig(**{**cfg.__dict__, "fast_forward": False, "record_tokens": True}))
    fast, fast_report = _run(ClusterConfig(**{**cfg.__dict__, "fast_forward": True, "record_tokens": True}))
    assert len(slow.requests) == len(fast.requests) > 100
    for a, b in zip(slow.requests, fast.requests):
        assert (a.id, a.error, a.tokens) == (b.id, b.error, b.tokens)
        assert b.token_times == pytest.approx(a.token_times, rel=1e-12, abs=1e-12)
    assert [(round(t, 9), d) for t, d in slow.decisions] == [(round(t, 9), d) for t, d in fast.decisions]
    assert slow.kills == fast.kills
    for key in ("ok", "wrong_answers", "errors", "kv_loads", "slo_attainment", "ttft_s", "tpot_s", "itl_s"):
        assert fast_report[key] == slow_report[key], key
    assert fast_report["gpu_hours"] == pytest.approx(slow_report["gpu_hours"], rel=1e-9)
    return fast


@pytest.mark.parametrize("prefill", [0, 2])
def test_fast_forward_matches_event_stepping(prefill):
    fast = _same(ClusterConfig(H100, prefill=prefill, decode=2, max_num_seqs=64))
    decode = [p for p in fast.pods.values() if p.role != "prefill"]
    # the fast path did run: most decode steps never went through EngineCore.step
    assert sum(p.fast_steps for p in decode) > 0.5 * sum(p.core.num_steps for p in decode)


def test_fast_forward_matches_with_preemption_faults_and_the_autoscaler():
    """A small KV pool (preemptions), failed loads and kills, and the autoscaler scaling both roles."""
    policy = AutoscalingPolicy(ttft_target_s=1.0, itl_target_s=0.012, min_prefill=1, max_prefill=4, min_decode=1,
                               max_decode=4, interval_s=2.0, scale_down_window_s=4.0, max_batch=64)
    small = H100.__class__(**{**H100.__dict__, "num_blocks": 250})
    fast = _same(ClusterConfig(small, prefill=1, decode=1, max_num_seqs=64, startup_s=1.0, autoscaling=policy,
                               faults=KVFaults(fail_rate=0.1, seed=2), kill_decode_every_s=5.0, max_model_len=4000))
    assert fast.kills >= 1 and fast.decisions
    assert sum(p.core.scheduler.get_stats().num_preemptions for p in fast.pods.values()) > 0
