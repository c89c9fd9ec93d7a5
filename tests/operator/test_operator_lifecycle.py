"""The real kopf operator against kmock: create, scale, change the model, delete, restart, bad specs."""

from __future__ import annotations

import asyncio
import json

from pdserve.operator import constants as c

SPEC = {"model": {"source": {"bundled": "smollm2-135m-instruct"}}}
EXPECTED = {
    ("ConfigMap", "chat-config"), ("ServiceAccount", "chat-router"), ("Role", "chat-router"),
    ("RoleBinding", "chat-router"), ("Service", "chat-prefill"), ("Service", "chat-decode"),
    ("Service", "chat-router"), ("Deployment", "chat-prefill"), ("Deployment", "chat-decode"),
    ("Deployment", "chat-router"), ("PodDisruptionBudget", "chat-prefill"),
    ("PodDisruptionBudget", "chat-decode"), ("PodDisruptionBudget", "chat-router"),
}


def template_hash(cluster, role: str) -> str:
    dep = cluster.children()[("Deployment", f"chat-{role}")]
    return dep["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_CONFIG_HASH]


def phase(cluster, name: str = "chat") -> str | None:
    return ((cluster.isvc(name) or {}).get("status") or {}).get("phase")


def condition(cluster, ctype: str, name: str = "chat") -> dict:
    return next(cd for cd in cluster.isvc(name)["status"]["conditions"] if cd["type"] == ctype)


async def test_create_scale_change_delete(cluster, operator_running) -> None:
    async with operator_running():
        # create -> every child appears, owned by the InferenceService (the garbage collector's cascade key)
        uid = (await cluster.create_isvc("chat", SPEC))["metadata"]["uid"]
        children = await cluster.wait_for(lambda: set(cluster.children()) == EXPECTED and cluster.children(),
                                          what="all children")
        for obj in children.values():
            assert obj["metadata"]["ownerReferences"] == [
                {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "chat", "uid": uid, "controller": True,
                 "blockOwnerDeletion": True}]
        assert not cluster.isvc("chat")["metadata"].get("finalizers"), "nothing outside Kubernetes to clean up"
        await cluster.wait_for(lambda: phase(cluster) == "Progressing", what="Progressing")
        assert cluster.isvc("chat")["status"]["url"] == "http://chat-router.default.svc:8000"

        # the Deployment controller rolls the pods out -> Ready, from the children's real state
        await cluster.roll_out()
        await cluster.wait_for(lambda: phase(cluster) == "Ready", what="Ready")
        st = cluster.isvc("chat")["status"]
        assert (st["prefill"]["ready"], st["decode"]["ready"], st["router"]["ready"]) == ("1/1", "1/1", "1/1")
        assert {cd["type"]: cd["status"] for cd in st["conditions"]} == {
            "Ready": "True", "PrefillReady": "True", "DecodeReady": "True", "RouterReady": "True",
            "Degraded": "False", "Progressing": "False"}
        assert st["servedModel"] == "smollm2-135m-instruct"

        # scale prefill -> exactly one merge patch of exactly spec.replicas; the pods do not roll
        hashes = {role: template_hash(cluster, role) for role in c.ROLES}
        mark = cluster.mark()
        await cluster.patch_isvc("chat", {"spec": {"prefill": {"replicas": 3}}})
        await cluster.wait_for(lambda: cluster.children()[("Deployment", "chat-prefill")]["spec"]["replicas"] == 3,
                               what="3 prefill replicas")
        await cluster.wait_for(lambda: phase(cluster) == "Progressing", what="Progressing after scale")
        writes = cluster.writes(mark)
        assert [(m, plural, name) for m, plural, name, _ in writes] == [("PATCH", "deployments", "chat-prefill")]
        body = writes[0][3]
        assert body["spec"] == {"replicas": 3}
        assert set(body["metadata"]) == {"annotations"}  # only the operator's last-applied record
        assert {role: template_hash(cluster, role) for role in c.ROLES} == hashes
        await cluster.roll_out()
        await cluster.wait_for(lambda: phase(cluster) == "Ready", what="Ready after scale")
        assert cluster.isvc("chat")["status"]["prefill"]["ready"] == "3/3"

        # change the model -> the config and the three pod templates change (so the pods roll); nothing else
        mark = cluster.mark()
        await cluster.patch_isvc("chat", {"spec": {"model": {"source": {"bundled": None, "hostPath": {
            "path": "/models/qwen3-0.6b"}}}}})
        await cluster.wait_for(lambda: template_hash(cluster, "router") != hashes["router"], what="router rolled")
        await asyncio.sleep(0.3)
        patched = sorted((plural, name) for _, plural, name, _ in cluster.writes(mark))
        assert patched == [("configmaps", "chat-config"), ("deployments", "chat-decode"),
                           ("deployments", "chat-prefill"), ("deployments", "chat-router")]
        assert all(template_hash(cluster, role) != hashes[role] for role in c.ROLES)
        engine = json.loads(cluster.children()[("ConfigMap", "chat-config")]["data"]["engine.json"])
        assert engine["model"]["model"] == "/models"
        prefill = cluster.children()[("Deployment", "chat-prefill")]["spec"]["template"]["spec"]
        assert {"name": "model", "hostPath": {"path": "/models/qwen3-0.6b", "type": "Directory"}} in prefill["volumes"]
        await cluster.wait_for(lambda: cluster.isvc("chat")["status"].get("servedModel") == "qwen3-0.6b",
                               what="status follows the model")

        # delete -> no finalizer holds it; the garbage collector removes the children by their owner reference,
        # and the operator neither recreates them nor keeps polling the deleted object
        await cluster.delete_isvc("chat")
        assert cluster.isvc("chat") is None
        deleted = await cluster.collect_garbage()
        assert len(deleted) == len(EXPECTED)
        mark = cluster.mark()
        await asyncio.sleep(1.0)
        assert cluster.children() == {}
        assert cluster.writes(mark) == []
        late_reads = [r for r in list(cluster.server)[mark + 2:] if r.name == "chat"]
        assert late_reads == [], "the status loop of a deleted object must stop"
