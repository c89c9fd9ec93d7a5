"""The operator's NetworkPolicies, exactly: which peer reaches which port of which pod, and nothing more."""

from __future__ import annotations

import pytest

from pdserve.operator import constants as c
from pdserve.operator import render, spec

GRPC_KV = {"kvConnector": {"type": "grpc"}}
REDIS = {"kvConnector": {"type": "redis", "redis": {"deploy": True}}}


def policies(s: dict) -> dict[str, dict]:
    objs = render.render(spec.parse("chat", "ns", s))
    return {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}


def role_peer(role: str) -> dict:
    return {"podSelector": {"matchLabels": {c.LABEL_SERVICE: "chat", c.LABEL_ROLE: role}}}


def ports(*numbers: int) -> list[dict]:
    return [{"port": n, "protocol": "TCP"} for n in numbers]


PROMETHEUS = {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
              "ports": ports(c.METRICS_PORT)}
FROM_ROUTER = {"from": [role_peer("router")], "ports": ports(c.HTTP_PORT, c.GRPC_PORT, c.KV_EVENTS_PORT)}


def test_each_port_admits_exactly_its_peers() -> None:
    got = policies(GRPC_KV)
    assert set(got) == {"chat-prefill", "chat-decode", "chat-router"}
    for name, pol in got.items():
        assert pol["policyTypes"] == ["Ingress"]
        assert pol["podSelector"] == {"matchLabels": {c.LABEL_SERVICE: "chat", c.LABEL_ROLE: name.split("-")[1]}}
    # the KV server of a prefill pod: this service's decode pods only
    assert got["chat-prefill"]["ingress"] == [FROM_ROUTER, {"from": [role_peer("decode")], "ports": ports(c.KV_PORT)},
                                              PROMETHEUS]
    assert got["chat-decode"]["ingress"] == [FROM_ROUTER, PROMETHEUS]
    # the router is the API: open to clients on its HTTP port (the API key guards it), metrics to Prometheus
    assert got["chat-router"]["ingress"] == [{"ports": ports(c.HTTP_PORT)}, PROMETHEUS]


def test_managed_redis_only_from_this_services_engines() -> None:
    got = policies(REDIS)
    assert got["chat-redis"]["ingress"] == [{"from": [role_peer("prefill"), role_peer("decode")],
                                             "ports": ports(c.REDIS_PORT)}]
    assert got["chat-prefill"]["ingress"] == [FROM_ROUTER, PROMETHEUS]  # no KV server without the grpc connector


def test_a_tensor_parallel_prefill_pod_opens_one_kv_port_per_rank() -> None:
    """Rank r of a prefill engine serves its KV heads on KV_PORT + r: decode pods reach every rank's server."""
    s = {**GRPC_KV, "prefill": {"parallelism": {"tensor": 3}}}
    got = policies(s)
    assert got["chat-prefill"]["ingress"][1] == {"from": [role_peer("decode")],
                                                 "ports": ports(c.KV_PORT, c.KV_PORT + 1, c.KV_PORT + 2)}
    objs = render.render(spec.parse("chat", "ns", s))
    prefill = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "chat-prefill")
    declared = [(p["name"], p["containerPort"]) for p in prefill["spec"]["template"]["spec"]["containers"][0]["ports"]]
    assert [p for p in declared if p[1] >= c.KV_PORT] == [
        ("kv", c.KV_PORT), ("kv-1", c.KV_PORT + 1), ("kv-2", c.KV_PORT + 2)]


@pytest.mark.parametrize("kv", [GRPC_KV, REDIS, {"kvConnector": {"type": "shared-fs", "sharedFs": {
    "claimName": "kv"}}}, {**GRPC_KV, "prefill": {"parallelism": {"tensor": 2}}}])
def test_every_declared_port_is_reachable_by_someone(kv: dict) -> None:
    """A port no rule admits would be dead (e.g. metrics unscraped); a rule for an undeclared port a leftover."""
    objs = render.render(spec.parse("chat", "ns", kv))
    pols = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        declared = {p["containerPort"] for ctr in dep["spec"]["template"]["spec"]["containers"]
                    for p in ctr.get("ports", [])}
        admitted = {p["port"] for rule in pols[dep["metadata"]["name"]]["ingress"] for p in rule["ports"]}
        assert admitted == declared, dep["metadata"]["name"]


def test_prometheus_selector_is_configurable_and_policies_can_be_turned_off() -> None:
    got = policies({"networkPolicy": {"prometheusNamespaceSelector": {"matchLabels": {"team": "obs"}}}})
    assert got["chat-decode"]["ingress"][-1]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]
    off = render.render(spec.parse("chat", "ns", {**REDIS, "networkPolicy": {"enabled": False}}))
    assert [o for o in off if o["kind"] == "NetworkPolicy"] == []
    # turning them off deletes the ones that exist: every policy name is a prunable child
    keys = set(render.child_keys("chat"))
    assert {("networking.k8s.io/v1", "NetworkPolicy", f"chat-{r}") for r in ("prefill", "decode", "router", "redis")
            } <= keys


def test_metrics_are_scraped_on_the_metrics_port() -> None:
    objs = render.render(spec.parse("chat", "ns", {"monitoring": {"serviceMonitor": True}}))
    (monitor,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    for svc in (o for o in objs if o["kind"] == "Service"):
        assert {"name": "metrics", "port": c.METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"} in svc[
            "spec"]["ports"]


def test_an_autoscaled_service_admits_the_operator_to_its_metrics_port() -> None:
    """The autoscaler runs in the operator's pods and scrapes the engines' metrics port: with ``autoscaling`` the
    metrics ingress admits pods labelled ``pdserve.io/metrics-reader`` (the chart labels the operator so)."""
    autoscaled = {**GRPC_KV, "autoscaling": {"ttftTargetSeconds": 1.0, "itlTargetSeconds": 0.02}}
    reader = {"namespaceSelector": {}, "podSelector": {"matchLabels": {c.LABEL_METRICS_READER: "true"}}}
    for name, pol in policies(autoscaled).items():
        assert pol["ingress"][-1] == {"from": [*PROMETHEUS["from"], reader], "ports": ports(c.METRICS_PORT)}, name
    for name, pol in policies(GRPC_KV).items():
        assert pol["ingress"][-1] == PROMETHEUS, name
