"""The real operator against kmock: generated Secrets (created once, rotated on request) and gated features."""

from __future__ import annotations

import asyncio
import base64

from pdserve.engine.security import ClusterSecret
from pdserve.operator import constants as c
from pdserve.operator.spec import Permissions
from test_operator_lifecycle import condition, phase, template

SPEC = {"model": {"source": {"bundled": "smollm2-135m-instruct"}},
        "kvConnector": {"type": "redis", "redis": {"deploy": True}}}


def secret_values(cluster, name: str) -> dict[str, str]:
    obj = cluster.children()[("Secret", name)]
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def env_of(cluster, role: str) -> dict[str, dict]:
    container = template(cluster, role)["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}


async def test_secrets_are_generated_once_and_rotated_on_request(cluster, operator_running) -> None:
    async with operator_running():
        await cluster.create_isvc("chat", SPEC)
        await cluster.wait_for(lambda: ("PodDisruptionBudget", "chat-router") in cluster.children(),
                               what="children")
        first = secret_values(cluster, "chat-cluster-secret")
        ClusterSecret.from_text(first[c.CLUSTER_SECRET_KEY])  # a valid cluster secret
        password = secret_values(cluster, "chat-redis-auth")[c.REDIS_PASSWORD_KEY]
        assert len(password) >= 32

        # each pod reads its secrets from the Secrets, as env; no value appears in an argument or the ConfigMap
        for role in ("prefill", "decode", "router"):
            ref = env_of(cluster, role)[c.CLUSTER_SECRET_ENV]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "chat-cluster-secret", "key": c.CLUSTER_SECRET_KEY}
        for role in c.ENGINE_ROLES:
            ref = env_of(cluster, role)[c.REDIS_PASSWORD_ENV]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "chat-redis-auth", "key": c.REDIS_PASSWORD_KEY}
        assert c.REDIS_PASSWORD_ENV not in env_of(cluster, "router")
        others = str({k: v for k, v in cluster.children().items() if k[0] != "Secret"})
        assert first[c.CLUSTER_SECRET_KEY] not in others and password not in others

        # a later reconcile (here: a scale) never regenerates them
        mark = cluster.mark()
        await cluster.patch_isvc("chat", {"spec": {"decode": {"replicas": 2}}})
        await cluster.wait_for(lambda: cluster.children()[("Deployment", "chat-decode")]["spec"]["replicas"] == 2,
                               what="scaled")
        await asyncio.sleep(0.3)
        assert [p for _, p, _, _ in cluster.writes(mark)] == ["deployments"]
        assert secret_values(cluster, "chat-cluster-secret") == first

        # rotation: a new annotation value regenerates both Secrets and rolls every pod that reads them
        await cluster.patch_isvc("chat", {"metadata": {"annotations": {c.ANNOTATION_ROTATE_SECRETS: "2026-12-06"}}})
        await cluster.wait_for(lambda: secret_values(cluster, "chat-cluster-secret") != first, what="rotated")
        await cluster.wait_for(lambda: secret_values(cluster, "chat-redis-auth")[c.REDIS_PASSWORD_KEY] != password,
                               what="Redis password rotated")
        for role in ("prefill", "decode", "router"):
            await cluster.wait_for(lambda role=role: template(cluster, role)["metadata"]["annotations"].get(
                c.ANNOTATION_ROTATE_SECRETS) == "2026-12-06", what=f"{role} rolled")
        redis = cluster.children()[("Deployment", "chat-redis")]["spec"]["template"]
        assert redis["metadata"]["annotations"][c.ANNOTATION_ROTATE_SECRETS] == "2026-12-06"

    # a restarted operator finds the rotated Secrets in place and keeps them
    rotated = secret_values(cluster, "chat-cluster-secret")
    mark = cluster.mark()
    async with operator_running():
        await cluster.wait_for(lambda: [r for r in list(cluster.server)[mark:] if r.method.value == "GET"
                                        and r.name == "chat-config"], what="the resume handler")
        await asyncio.sleep(0.5)
    assert cluster.writes(mark) == []
    assert secret_values(cluster, "chat-cluster-secret") == rotated


async def test_host_path_and_extra_args_only_where_the_operator_allows_them(cluster, operator_running) -> None:
    host = {"model": {"source": {"hostPath": {"path": "/models/qwen3"}}}}
    async with operator_running():
        await cluster.create_isvc("chat", host)
        await cluster.wait_for(lambda: phase(cluster) == "Degraded", what="Degraded")
        degraded = condition(cluster, "Degraded")
        assert degraded["reason"] == "NotPermitted" and "operator.allowHostPath" in degraded["message"]
        assert cluster.children() == {}
        await cluster.patch_isvc("chat", {"spec": {"model": None, "router": {"extraArgs": ["--api-key", "x"]}}})
        await cluster.wait_for(lambda: "operator.allowExtraArgs" in condition(cluster, "Degraded")["message"],
                               what="extraArgs refused")
        assert cluster.children() == {}
        await cluster.delete_isvc("chat")

    async with operator_running(permissions=Permissions(host_path=True, extra_args=True)):
        await cluster.create_isvc("chat2", {**host, "decode": {"extraArgs": ["--enforce-eager"]}})
        await cluster.wait_for(lambda: ("PodDisruptionBudget", "chat2-router") in cluster.children(),
                               what="children")
        decode = cluster.children()[("Deployment", "chat2-decode")]["spec"]["template"]["spec"]
        assert decode["containers"][0]["args"][-1] == "--enforce-eager"
        assert {"name": "model", "hostPath": {"path": "/models/qwen3", "type": "Directory"}} in decode["volumes"]
