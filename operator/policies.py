"""NetworkPolicies of one InferenceService: each of its pods accepts exactly the peers that need each port.

=============  ==========================================  ==========================================
pods           port(s)                                     from
=============  ==========================================  ==========================================
prefill        http, grpc, kv-events                       this service's router pods
prefill        kv (grpc connector)                         this service's decode pods
decode         http, grpc, kv-events                       this service's router pods
router         http                                        anywhere (the API; clients need the key)
redis          redis (managed Redis)                       this service's prefill and decode pods
all but redis  metrics                                     pods of the Prometheus namespaces; with
                                                           autoscaling, the operator's pods (their
                                                           ``pdserve.io/metrics-reader`` label)
=============  ==========================================  ==========================================

Only ingress is restricted (egress stays open: pods pull images and models, and talk to the API server).
Kubelet probes are not subject to NetworkPolicies on the common CNIs, so health checks keep working. A policy
selects pods by the same immutable labels as the Deployments, so it follows every pod of its role.
"""

from __future__ import annotations

from typing import Any

from pdserve.operator import constants as c
from pdserve.operator import pods
from pdserve.operator.spec import ServiceSpec

Obj = dict[str, Any]

# Roles that get a policy; a NetworkPolicy named "<service>-<role>" (redis only with a managed Redis).
POLICY_ROLES = ("prefill", "decode", "router", "redis")


def _ports(*numbers: int) -> list[Obj]:
    return [{"port": n, "protocol": "TCP"} for n in numbers]


def _from_role(name: str, *roles: str) -> list[Obj]:
    return [{"podSelector": {"matchLabels": pods.selector_labels(name, role)}} for role in roles]


def _policy(s: ServiceSpec, role: str, ingress: list[Obj]) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{s.name}-{role}", "namespace": s.namespace, "labels": pods.labels(s.name, role)},
            "spec": {"podSelector": {"matchLabels": pods.selector_labels(s.name, role)},
                     "policyTypes": ["Ingress"], "ingress": ingress}}


def network_policies(s: ServiceSpec) -> list[Obj]:
    """Every NetworkPolicy of ``s`` (none when ``spec.networkPolicy.enabled`` is false)."""
    if not s.network_policy.enabled:
        return []
    readers: list[Obj] = [{"namespaceSelector": s.network_policy.prometheus_namespaces}]
    if s.autoscaling is not None:  # the autoscaler in the operator's pods reads the engines' metrics
        readers.append({"namespaceSelector": {},
                        "podSelector": {"matchLabels": {c.LABEL_METRICS_READER: "true"}}})
    metrics = {"from": readers, "ports": _ports(c.METRICS_PORT)}
    api = {"from": _from_role(s.name, "router"), "ports": _ports(c.HTTP_PORT, c.GRPC_PORT, c.KV_EVENTS_PORT)}
    prefill = [api]
    if s.kv.type == "grpc":
        prefill.append({"from": _from_role(s.name, "decode"), "ports": _ports(*pods.kv_ports(s))})
    out = [_policy(s, "prefill", [*prefill, metrics]), _policy(s, "decode", [api, metrics]),
           _policy(s, "router", [{"ports": _ports(c.HTTP_PORT)}, metrics])]
    if s.kv.type == "redis" and s.kv.redis_deploy:
        out.append(_policy(s, "redis", [{"from": _from_role(s.name, *c.ENGINE_ROLES),
                                         "ports": _ports(c.REDIS_PORT)}]))
    return out
