"""Pure status computation: the children's real state -> the InferenceService's ``status``.

Conditions follow the Kubernetes convention (``type``, ``status``, ``reason``, ``message``,
``lastTransitionTime``, ``observedGeneration``); a condition keeps its ``lastTransitionTime`` while its status
does not change, so recomputing an unchanged state yields an identical status and no write.

::

    Ready        = PrefillReady and DecodeReady and RouterReady and not Degraded
    <Role>Ready  = its Deployment saw the latest template, and ready == updated == desired
    Degraded     = the spec is invalid, or a Deployment reports ReplicaFailure / ProgressDeadlineExceeded
    Progressing  = not Ready and not Degraded (a rollout or a scale is under way)
    phase        = Degraded | Ready | Progressing | Pending (nothing created yet)
"""

from __future__ import annotations

from typing import Any, Mapping

from pdserve.operator import constants as c

Obj = dict[str, Any]
CONDITION_TYPES = ("Ready", "PrefillReady", "DecodeReady", "RouterReady", "Degraded", "Progressing")


def role_state(deployment: Mapping[str, Any] | None, desired: int) -> tuple[Obj, bool, str, str]:
    """``(replica counts, ready?, reason, message)`` of one role from its Deployment (None: not created yet)."""
    if deployment is None:
        return ({"replicas": desired, "readyReplicas": 0, "updatedReplicas": 0, "ready": f"0/{desired}"},
                False, "DeploymentMissing", "the Deployment does not exist yet")
    st = deployment.get("status") or {}
    ready, updated = st.get("readyReplicas") or 0, st.get("updatedReplicas") or 0
    current = st.get("replicas") or 0
    counts = {"replicas": desired, "readyReplicas": ready, "updatedReplicas": updated, "ready": f"{ready}/{desired}"}
    generation = (deployment.get("metadata") or {}).get("generation") or 0
    if (st.get("observedGeneration") or 0) < generation:
        return counts, False, "RolloutPending", "the Deployment controller has not seen the latest spec yet"
    if desired == 0:
        if current == 0:
            return counts, True, "ScaledToZero", "scaled to zero replicas"
        return counts, False, "ScalingDown", f"{current} pod(s) still terminating"
    if updated < desired or current > desired:
        return counts, False, "RollingOut", f"{updated}/{desired} pods updated, {current} running"
    if ready < desired:
        return counts, False, "PodsNotReady", f"{ready}/{desired} pods ready"
    return counts, True, "AllReplicasReady", f"{ready}/{desired} pods ready"


def deployment_failure(deployment: Mapping[str, Any] | None) -> str | None:
    """A message when the Deployment controller reports that the rollout cannot proceed."""
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return f"ReplicaFailure: {cond.get('message', '')}".strip()
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return f"ProgressDeadlineExceeded: {cond.get('message', '')}".strip()
    return None


def condition(ctype: str, ok: bool, reason: str, message: str, generation: int, now: str,
              previous: Mapping[str, Mapping[str, Any]]) -> Obj:
    """One condition; ``lastTransitionTime`` moves only when ``status`` flips."""
    status = "True" if ok else "False"
    before = previous.get(ctype)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or now, "observedGeneration": generation}


def compute(*, generation: int, desired: Mapping[str, int] | None, deployments: Mapping[str, Mapping[str, Any] | None],
            spec_error: str | None, spec_error_reason: str = "InvalidSpec", served_model: str | None,
            url: str | None, previous: Mapping[str, Any] | None, now: str) -> Obj:
    """The whole ``status``.

    ``desired`` maps role -> replicas from a valid spec (None when the spec is invalid: the Deployments' own replica
    counts are used); ``deployments`` maps role -> the live Deployment or None; ``previous`` is the current status
    (for transition times); ``now`` is an RFC 3339 timestamp.
    """
    prev_conditions = {cd.get("type"): cd for cd in (previous or {}).get("conditions") or [] if isinstance(cd, Mapping)}
    status: Obj = {"observedGeneration": generation}
    conditions: list[Obj] = []
    roles_ok: list[bool] = []
    failures: list[str] = []
    for role in c.ROLES:
        dep = deployments.get(role)
        if desired is not None:
            want = desired.get(role, 0)
        else:  # an invalid spec changes nothing: report what the last valid one still runs
            want = ((dep or {}).get("spec") or {}).get("replicas") or 0
        counts, ok, reason, message = role_state(dep, want)
        status[role] = counts
        roles_ok.append(ok)
        failure = deployment_failure(dep)
        if failure:
            failures.append(f"{role}: {failure}")
        conditions.append(condition(f"{role.capitalize()}Ready", ok, reason, message, generation, now,
                                    prev_conditions))
    if spec_error is not None:
        degraded, d_reason, d_message = True, spec_error_reason, spec_error
    elif failures:
        degraded, d_reason, d_message = True, "RolloutFailed", "; ".join(failures)
    else:
        degraded, d_reason, d_message = False, "AsExpected", "no problem found"
    ready = all(roles_ok) and not degraded
    progressing = not ready and not degraded
    any_created = any(dep is not None for dep in deployments.values())
    conditions.insert(0, condition("Ready", ready, "AllRolesReady" if ready else "NotReady",
                                   "prefill, decode and router are ready" if ready else
                                   _not_ready_message(conditions), generation, now, prev_conditions))
    conditions.append(condition("Degraded", degraded, d_reason, d_message, generation, now, prev_conditions))
    conditions.append(condition("Progressing", progressing, "RollingOut" if progressing else
                                ("Complete" if ready else "Blocked"),
                                "waiting for the roles to become ready" if progressing else
                                ("the rollout is complete" if ready else "see the Degraded condition"),
                                generation, now, prev_conditions))
    status["conditions"] = conditions
    status["phase"] = ("Degraded" if degraded else "Ready" if ready else
                       "Progressing" if any_created else "Pending")
    if served_model:
        status["servedModel"] = served_model
    if url:
        status["url"] = url
    return status


def _not_ready_message(role_conditions: list[Obj]) -> str:
    waiting = [f"{cd['type'][:-len('Ready')].lower()} ({cd['reason']})" for cd in role_conditions
               if cd["status"] != "True"]
    return "waiting for " + ", ".join(waiting) if waiting else "degraded"


def same_status(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change nothing that the operator owns in ``current``."""
    current = current or {}
    return all(current.get(key) == value for key, value in new.items())
