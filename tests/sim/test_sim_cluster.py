"""``pdserve sim``: the virtual-time cluster — answers checked, faults counted, the autoscaler following a shifting
mix within min/max and budget, and the CLI's refusals."""

from __future__ import annotations

import json

import pytest
from pdserve.operator.autoscaler import AutoscalingPolicy
from pdserve.sim.cluster import Cluster, ClusterConfig
from pdserve.sim.cost_model import load_profile
from pdserve.sim.kv import KVFaults
from pdserve.sim.report import summarize
from pdserve.sim.workload import Phase, generate, parse_trace

from pdserve.cli.main import main

H100 = load_profile("llama-3.1-8b_h100")


def _run(cfg: ClusterConfig, trace: str, ttft: float = 1.0, tpot: float = 0.05) -> tuple[dict, Cluster]:
    cluster = Cluster(cfg)
    cluster.requests = cluster.run(generate(parse_trace(trace), seed=cfg.seed))
    return summarize(cluster.requests, cluster, ttft, tpot), cluster


def test_trace_phases_parse_and_generate_deterministically():
    phases = parse_trace("duration=10,rate=5,in=100:200,out=7;duration=5,rate=2,tenants=2,prefix=64,in=100")
    assert phases[0] == Phase(10.0, 5.0, (100, 200), (7, 7))
    assert phases[1].tenants == 2 and phases[1].prefix_len == 64
    a, b = generate(phases, seed=3), generate(phases, seed=3)
    assert a == b and all(x.arrival_s < y.arrival_s for x, y in zip(a, a[1:]))
    assert all(100 <= len(r.prompt) <= 200 for r in a if r.arrival_s < 10)
    shared = [r for r in a if r.tenant == 0]
    assert len({r.prompt[:64] for r in shared}) == 1
    with pytest.raises(ValueError, match="use key=value pairs"):
        parse_trace("duration=10,speed=3")
    with pytest.raises(ValueError, match="positive duration"):
        parse_trace("rate=0")


@pytest.mark.parametrize("prefill", [0, 2])
def test_every_answer_is_checked_and_correct(prefill):
    report, _ = _run(ClusterConfig(H100, prefill=prefill, decode=2), "duration=10,rate=5,in=300:900,out=2:40")
    assert report["requests"] > 30
    assert report["ok"] == report["requests"] and report["wrong_answers"] == 0 and report["errors"] == {}
    # an idle 8B on an H100: a 900-token prefill is ~30 ms, a decode step ~6 ms
    assert report["ttft_s"]["p99"] < 0.1 and report["tpot_s"]["p50"] == pytest.approx(0.006, rel=0.1)


def test_faults_end_every_request_in_a_correct_answer_or_a_counted_error():
    """5 % failed KV loads (recomputed), a decode pod killed every 5 s, a slow connector (0.2 s + 1 GB/s)."""
    faults = KVFaults(fail_rate=0.05, latency_s=0.2, bandwidth_gbps=1.0, seed=1)
    cfg = ClusterConfig(H100, prefill=2, decode=4, faults=faults, kill_decode_every_s=5.0, startup_s=2.0, seed=1)
    report, cluster = _run(cfg, "duration=20,rate=10,in=500,out=200")
    assert report["wrong_answers"] == 0
    killed = report["errors"].pop("decode pod killed mid-request")
    assert report["errors"] == {} and killed > 0 and cluster.kills == 3  # at 5, 10 and 15 s
    assert report["ok"] + killed == report["requests"]
    loads = report["kv_loads"]
    assert loads["failed"] > 0 and loads["loaded"] + loads["failed"] <= loads["loads"]
    # the slow connector shows between the first token (prefill) and the second (decode): 0.2 s + 64 MB at 1 GB/s
    handoffs = [r.second_token_s - r.first_token_s for r in cluster.requests if r.error is None]
    assert min(handoffs) >= 0.2 + 500 * H100.kv_bytes_per_token / 1e9


def test_failed_loads_under_the_fail_policy_are_clear_errors():
    cfg = ClusterConfig(H100, prefill=1, decode=1, faults=KVFaults(fail_rate=1.0), load_failure_policy="fail")
    report, _ = _run(cfg, "duration=5,rate=4,in=200,out=5")
    assert report["ok"] == 0
    assert report["errors"] == {"KV transfer failed (transfer_failed): injected KV transfer failure":
                                report["requests"]}


def test_autoscaler_follows_the_mix_within_min_max_and_budget():
    """Prompt-heavy, then decode-heavy (pods of 32 sequences): prefill goes up then down, decode the reverse."""
    policy = AutoscalingPolicy(ttft_target_s=1.0, itl_target_s=0.02, min_prefill=1, max_prefill=6, min_decode=1,
                               max_decode=6, gpu_budget=9, interval_s=5.0, scale_down_window_s=20.0, max_batch=32)
    cfg = ClusterConfig(H100, prefill=1, decode=1, max_num_seqs=32, startup_s=5.0, autoscaling=policy)
    _, cluster = _run(cfg, "duration=40,rate=20,in=3000,out=4;duration=40,rate=30,in=100,out=300")
    phase1 = [d for t, d in cluster.decisions if 15 <= t <= 40]
    phase2 = [d for t, d in cluster.decisions if 60 <= t <= 80]
    assert max(d.prefill for d in phase1) >= 3 and max(d.decode for d in phase1) <= 2
    assert max(d.decode for d in phase2) >= 3 and min(d.prefill for d in phase2) < max(d.prefill for d in phase1)
    for _, p, d in cluster.timeline:
        assert 1 <= p <= 6 and 1 <= d <= 6 and p + d <= 9 + 1  # +1: a killed/drained pod's last moment
    for t, d in cluster.decisions:  # never down and back up within the scale-down window
        later = [e for s, e in cluster.decisions if t < s <= t + policy.scale_down_window_s]
        for e, f in zip(later, later[1:]):
            assert not (e.prefill < d.prefill and f.prefill > e.prefill and f.prefill <= d.prefill)


def test_cli_writes_a_report_and_refuses_contradictions(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["sim", "--prefill", "1", "--decode", "1", "--trace", "duration=5,rate=2,in=100,out=5",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] == report["requests"] > 0 and report["timeline"][0][1:] == [1, 1]
    assert main(["sim", "--prefill", "0", "--decode", "2", "--autoscale"]) == 2
    assert "needs --prefill >= 1" in capsys.readouterr().err
    assert main(["sim", "--gpu-budget", "4"]) == 2
    assert "add --autoscale" in capsys.readouterr().err
    assert main(["sim", "--prefill", "0", "--kv-fault-fail-rate", "0.1"]) == 2
    assert "colocated pods (--prefill 0) load none" in capsys.readouterr().err
