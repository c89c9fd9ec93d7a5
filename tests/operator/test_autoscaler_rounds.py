"""The operator's autoscaling rounds (operator/autoscaling.py): with ``scaleUpIntervalSeconds``, the rounds
between two decisions are scale-up checks on their own window; decisions keep their interval."""

from __future__ import annotations

import types
from typing import Any

from pdserve.operator import autoscaling, kube
from pdserve.operator.autoscaler import AutoscalingPolicy, Observation

POLICY = AutoscalingPolicy(ttft_target_s=1.0, itl_target_s=0.05, max_prefill=20, max_decode=20, interval_s=10.0,
                           scale_up_interval_s=2.0, tolerance=0.0)


class Source:
    """Hands out the observations given, recording whether each round asked for a check."""

    def __init__(self, load: list[float]) -> None:
        self.load, self.calls = load, []

    def observe(self, api: Any, namespace: str, name: str, policy: Any, check: bool = False) -> Observation:
        self.calls.append(check)
        window = policy.scale_up_interval_s if check else policy.interval_s
        tokens = self.load.pop(0) * window  # prompt tokens a second, over the window
        return Observation(window_s=window, prefill_pods=2, decode_pods=1, arrived_prompt_tokens=tokens,
                           queued_prompt_tokens=0.0, prefill_computed_tokens=tokens, prefill_busy_s=tokens / 7000,
                           ttft_p=0.8, decode_sequences=0.0, itl_p=None)


def test_checks_between_decisions_scale_up_only(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(autoscaling, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    replicas = {"chat-prefill": 2, "chat-decode": 1}
    monkeypatch.setattr(kube, "read_deployment", lambda api, ns, name: {"spec": {"replicas": replicas[name]}})
    monkeypatch.setattr(kube, "scale_deployment", lambda api, ns, name, n: replicas.__setitem__(name, n))
    monkeypatch.setattr(kube, "patch_status", lambda api, ns, name, patch: None)
    # mu = 7000 tok/s a pod (computed over busy time); headroom 0.7: 4,900 tok/s a pod
    source = Source([9800, 30000, 9000, 9800])
    run = autoscaling.AutoscalerRun(source)
    parsed = types.SimpleNamespace(autoscaling=POLICY)
    decision, _ = autoscaling.autoscale_round(None, "ns", "chat", parsed, run, "t0")
    assert source.calls == [False] and decision.prefill == 2  # 9800 / 4900 = 2
    assert run.next_delay(POLICY) == 2.0
    clock[0] += 2.0
    decision, changes = autoscaling.autoscale_round(None, "ns", "chat", parsed, run, "t1")
    assert source.calls[-1] is True and decision.prefill == 7 and changes == ["prefill 2->7"]  # 30000 / 4900
    clock[0] += 2.0
    assert autoscaling.autoscale_round(None, "ns", "chat", parsed, run, "t2") is None  # a check never lowers
    assert replicas["chat-prefill"] == 7
    clock[0] += 5.5  # 9.5 s after the decision: the loop sleeps only until the decision is due
    assert run.next_delay(POLICY) == 0.5
    clock[0] += 0.5
    decision, _ = autoscaling.autoscale_round(None, "ns", "chat", parsed, run, "t3")
    assert source.calls[-1] is False and decision.prefill == 7  # kept: the scale-down window holds the peak
