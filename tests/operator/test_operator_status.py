"""Status from the children's state: role readiness, conditions, phase and stable transition times."""

from __future__ import annotations

import pytest

from pdserve.operator import status

NOW, LATER = "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z"


def dep(replicas: int = 1, ready: int = 1, updated: int | None = None, current: int | None = None,
        generation: int = 1, observed: int = 1, conditions: list | None = None) -> dict:
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas if current is None else current,
                       "readyReplicas": ready, "updatedReplicas": replicas if updated is None else updated,
                       "conditions": conditions or []}}


ROLE_CASES = [
    # (deployment, desired, ready?, reason)
    (None, 1, False, "DeploymentMissing"),
    (dep(observed=0, generation=2), 1, False, "RolloutPending"),
    (dep(replicas=2, ready=2, updated=1), 2, False, "RollingOut"),
    (dep(replicas=2, ready=2, current=3), 2, False, "RollingOut"),  # an old pod still running
    (dep(replicas=2, ready=1), 2, False, "PodsNotReady"),
    (dep(replicas=2, ready=2), 2, True, "AllReplicasReady"),
    (dep(replicas=0, ready=0, current=0), 0, True, "ScaledToZero"),
    (dep(replicas=0, ready=0, current=1), 0, False, "ScalingDown"),
]


@pytest.mark.parametrize("deployment, desired, ok, reason", ROLE_CASES, ids=[c[3] for c in ROLE_CASES])
def test_role_state(deployment, desired, ok, reason) -> None:
    counts, got_ok, got_reason, _ = status.role_state(deployment, desired)
    assert (got_ok, got_reason) == (ok, reason)
    assert counts["replicas"] == desired
    assert counts["ready"] == f"{counts['readyReplicas']}/{desired}"


def compute(deployments: dict, previous: dict | None = None, now: str = NOW, error: str | None = None,
            desired: dict | None = None) -> dict:
    if desired is None and error is None:
        desired = {"prefill": 1, "decode": 1, "router": 1}
    return status.compute(generation=3, desired=desired, deployments=deployments, spec_error=error,
                          served_model="m", url="http://x", previous=previous, now=now)


def conditions(st: dict) -> dict:
    return {cd["type"]: (cd["status"], cd["reason"]) for cd in st["conditions"]}


def test_all_ready() -> None:
    st = compute({"prefill": dep(), "decode": dep(), "router": dep()})
    assert st["phase"] == "Ready"
    assert conditions(st) == {"Ready": ("True", "AllRolesReady"), "PrefillReady": ("True", "AllReplicasReady"),
                              "DecodeReady": ("True", "AllReplicasReady"), "RouterReady": ("True", "AllReplicasReady"),
                              "Degraded": ("False", "AsExpected"), "Progressing": ("False", "Complete")}
    assert all(cd["observedGeneration"] == 3 and cd["lastTransitionTime"] == NOW for cd in st["conditions"])
    assert (st["observedGeneration"], st["servedModel"], st["url"]) == (3, "m", "http://x")


def test_nothing_created_yet_is_pending() -> None:
    st = compute({"prefill": None, "decode": None, "router": None})
    assert st["phase"] == "Pending"
    assert conditions(st)["Progressing"] == ("True", "RollingOut")
    assert "prefill (DeploymentMissing)" in next(c for c in st["conditions"] if c["type"] == "Ready")["message"]


def test_rollout_in_progress() -> None:
    st = compute({"prefill": dep(ready=0), "decode": dep(), "router": dep()})
    assert st["phase"] == "Progressing"
    assert conditions(st)["PrefillReady"] == ("False", "PodsNotReady")
    assert conditions(st)["Ready"][0] == "False"


@pytest.mark.parametrize("cond, words", [
    ({"type": "ReplicaFailure", "status": "True", "message": "exceeded quota"}, "ReplicaFailure: exceeded quota"),
    ({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"},
     "ProgressDeadlineExceeded"),
])
def test_a_stuck_rollout_is_degraded(cond: dict, words: str) -> None:
    st = compute({"prefill": dep(ready=0, conditions=[cond]), "decode": dep(), "router": dep()})
    assert st["phase"] == "Degraded"
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "RolloutFailed" and words in degraded["message"]
    assert conditions(st)["Progressing"] == ("False", "Blocked")


def test_invalid_spec_reports_what_still_runs() -> None:
    st = compute({"prefill": dep(replicas=2, ready=2), "decode": dep(), "router": None},
                 error="spec.prefill.replicas: must be >= 0, got -1")
    assert st["phase"] == "Degraded"
    assert conditions(st)["Degraded"] == ("True", "InvalidSpec")
    assert st["prefill"]["ready"] == "2/2"  # the Deployment's own replica count
    assert conditions(st)["PrefillReady"] == ("True", "AllReplicasReady")
    assert conditions(st)["Ready"][0] == "False"


def test_transition_times_move_only_when_a_condition_flips() -> None:
    progressing = compute({"prefill": dep(ready=0), "decode": dep(), "router": dep()})
    ready = compute({"prefill": dep(), "decode": dep(), "router": dep()}, previous=progressing, now=LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": LATER, "PrefillReady": LATER, "DecodeReady": NOW, "RouterReady": NOW,
                     "Degraded": NOW, "Progressing": LATER}
    again = compute({"prefill": dep(), "decode": dep(), "router": dep()}, previous=ready, now="2030-01-01T00:00:00Z")
    assert again == ready
    assert status.same_status({**ready, "kopf": {}}, again)  # fields of others are not ours to compare
