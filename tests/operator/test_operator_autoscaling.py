"""The real operator's autoscaler against kmock's in-memory Kubernetes API, fed by the simulator: the simulated
pods follow the Deployments' replicas, and their metrics drive the next decision."""

from __future__ import annotations

import time
from typing import Any

import kubernetes
from pdserve.operator.autoscaler import Observation
from pdserve.sim.cluster import Cluster, ClusterConfig
from pdserve.sim.cost_model import load_profile
from pdserve.sim.workload import generate, parse_trace

# Prompt-heavy for 60 s, then decode-heavy for 60 s (virtual), on pods of at most 32 sequences.
TRACE = "duration=60,rate=20,in=3000,out=4;duration=60,rate=30,in=100,out=300"
WINDOW_S = 5.0  # virtual seconds per autoscaling round


class SimFedMetrics:
    """A MetricsSource: each round the simulated cluster takes the Deployments' replicas as its pod counts, runs
    the next window of virtual time, and reports what its pods' metrics say."""

    def __init__(self) -> None:
        self.sim = Cluster(ClusterConfig(load_profile("llama-3.1-8b_h100"), prefill=1, decode=1, max_num_seqs=32,
                                         startup_s=WINDOW_S))
        self.sim.start(generate(parse_trace(TRACE)))
        self.rounds: list[tuple[float, float, int, int]] = []  # (wall time, virtual time, prefill, decode)

    def observe(self, api: Any, namespace: str, name: str, policy: Any) -> Observation | None:
        apps = kubernetes.client.AppsV1Api(api)
        counts = [apps.read_namespaced_deployment(f"{name}-{role}", namespace).spec.replicas
                  for role in ("prefill", "decode")]
        self.rounds.append((time.monotonic(), self.sim.now, *counts))
        if not self.sim.remaining:
            return None
        self.sim.scale_to("prefill", counts[0])
        self.sim.scale_to("decode", counts[1])
        self.sim.advance(self.sim.now + WINDOW_S)
        return self.sim.observe(WINDOW_S, policy.percentile)


def _spec(**autoscaling: Any) -> dict:
    return {"model": {"source": {"bundled": "smollm2-135m-instruct"}}, "engine": {"maxNumSeqs": 32},
            "autoscaling": {"ttftTargetSeconds": 1.0, "itlTargetSeconds": 0.02, "minPrefill": 1, "maxPrefill": 6,
                            "minDecode": 1, "maxDecode": 6, "gpuBudget": 9, "intervalSeconds": 0.2,
                            "scaleDownWindowSeconds": 1.5, "tolerance": 0.0, **autoscaling}}


async def test_autoscaler_scales_both_deployments_within_bounds_without_flapping(cluster, operator_running):
    source = SimFedMetrics()
    async with operator_running(metrics_source=lambda: source):
        await cluster.create_isvc("chat", _spec())
        await cluster.wait_for(lambda: not source.sim.remaining, timeout=480, what="the whole simulated trace")
    rounds = source.rounds
    phase1 = [r for r in rounds if 20 <= r[1] <= 60]
    phase2 = [r for r in rounds if 80 <= r[1] <= 120]
    assert max(r[2] for r in phase1) >= 3 and max(r[3] for r in phase1) <= 2, rounds
    assert max(r[3] for r in phase2) >= 3 and min(r[2] for r in phase2) < max(r[2] for r in phase1), rounds
    for _, _, p, d in rounds:
        assert 1 <= p <= 6 and 1 <= d <= 6 and p + d <= 9
    # Never up and back down within the 1.5 s scale-down window. Changes are seen one round after the decision,
    # and rounds jitter on a loaded machine, so the check allows half the window; without the window a count would
    # come down one round (0.2 s) after going up.
    for role in (2, 3):
        ups = [b[0] for a, b in zip(rounds, rounds[1:]) if b[role] > a[role]]
        downs = [b[0] for a, b in zip(rounds, rounds[1:]) if b[role] < a[role]]
        assert not any(0 < d - u < 0.75 for u in ups for d in downs), (role, rounds)
    st = cluster.isvc("chat")["status"]["autoscaling"]
    assert st["dryRun"] is False and st["reason"].startswith("prefill ")
    events = cluster.events("Autoscaled")
    assert events and all(e["type"] == "Normal" and e["message"].startswith("scaled ") for e in events)
    # every request of the trace ended; the answers are the simulated model's
    assert all(r.done for r in source.sim.requests)
    assert sum(r.error is None for r in source.sim.requests) == len(source.sim.requests)


async def test_dry_run_reports_and_never_scales(cluster, operator_running):
    source = SimFedMetrics()
    async with operator_running(metrics_source=lambda: source):
        await cluster.create_isvc("chat", _spec(dryRun=True))
        await cluster.wait_for(lambda: len(source.rounds) >= 8, timeout=180, what="eight rounds")
        await cluster.wait_for(lambda: cluster.events("AutoscaleDryRun"), what="a dry-run Event")
        st = cluster.isvc("chat")["status"]["autoscaling"]
    assert all((p, d) == (1, 1) for _, _, p, d in source.rounds)
    assert st["dryRun"] is True and st["wantedPrefill"] > 1
    assert cluster.events("AutoscaleDryRun")[0]["message"].startswith("would scale prefill 1->")
    assert not cluster.events("Autoscaled")


async def test_replicas_outside_the_autoscaling_range_are_refused(cluster, operator_running):
    spec = _spec()
    spec["prefill"] = {"replicas": 7}
    async with operator_running():
        await cluster.create_isvc("chat", spec)
        (ev,) = await cluster.wait_for(lambda: cluster.events("InvalidSpec"), what="an InvalidSpec Event")
    assert "spec.prefill.replicas: must be within the autoscaling range [1, 6]" in ev["message"]
