"""Create-or-patch and prune with the real kubernetes client against kmock, without kopf: exact requests."""

from __future__ import annotations

import asyncio
import json

import kmock
import pytest

from pdserve.operator import constants as c
from pdserve.operator import kube

UID = "11111111-2222-3333-4444-555555555555"
DEPLOYMENTS = kmock.resource("apps/v1/deployments")


def deployment(replicas: int = 1, **labels: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web", **labels},
                         "ownerReferences": [{"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "chat",
                                              "uid": UID, "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


async def apply(cluster, obj: dict) -> str:
    return await asyncio.to_thread(kube.apply, cluster.api, obj, UID)


async def test_create_then_nothing_then_exactly_the_difference(cluster) -> None:
    assert await apply(cluster, deployment()) == "created"
    live = cluster.get("apps/v1/deployments", "web")
    assert json.loads(live["metadata"]["annotations"][c.ANNOTATION_LAST_APPLIED]) == deployment()

    mark = cluster.mark()
    assert await apply(cluster, deployment()) == "unchanged"
    assert cluster.writes(mark) == []

    assert await apply(cluster, deployment(replicas=3, tier="gpu")) == "patched"
    [(method, _, _, body)] = cluster.writes(mark)
    assert method == "PATCH"
    assert body == {"metadata": {"labels": {"tier": "gpu"}, "annotations": {
                        c.ANNOTATION_LAST_APPLIED: json.dumps(deployment(replicas=3, tier="gpu"), sort_keys=True,
                                                              separators=(",", ":"))}},
                    "spec": {"replicas": 3}}
    patch_request = [r for r in list(cluster.server)[mark:] if r.method.value == "PATCH"][0]
    assert patch_request.headers["Content-Type"] == "application/merge-patch+json"

    # a label the operator stops writing is removed; one somebody else added stays
    cluster.server.objects[DEPLOYMENTS, "default", "web"].patch({"metadata": {"labels": {"team": "a"}}})
    mark = cluster.mark()
    assert await apply(cluster, deployment(replicas=3)) == "patched"
    [(_, _, _, body)] = cluster.writes(mark)
    assert body["metadata"]["labels"] == {"tier": None}
    assert cluster.get("apps/v1/deployments", "web")["metadata"]["labels"] == {"app": "web", "team": "a"}


async def test_a_concurrent_create_is_not_an_error(cluster) -> None:
    # someone else's create lands between our read and our create: 409, then we patch what differs
    cluster.server["post", DEPLOYMENTS][:1] << 409
    assert await apply(cluster, deployment(replicas=2)) == "unchanged"
    assert cluster.get("apps/v1/deployments", "web")["spec"]["replicas"] == 2


async def test_a_concurrent_delete_is_not_an_error(cluster) -> None:
    await apply(cluster, deployment())

    def gone(request: kmock.Request) -> dict:
        cluster.server.objects[DEPLOYMENTS, "default", "web"].delete()
        return {"kind": "Status", "code": 404}

    cluster.server["patch", DEPLOYMENTS][:1] << 404 << gone
    assert await apply(cluster, deployment(replicas=5)) == "created"
    assert cluster.get("apps/v1/deployments", "web")["spec"]["replicas"] == 5


async def test_an_object_of_someone_else_is_never_taken_over(cluster) -> None:
    foreign = deployment()
    foreign["metadata"]["ownerReferences"] = []
    await apply(cluster, foreign)  # created by "someone": no owner reference to the InferenceService
    mark = cluster.mark()
    with pytest.raises(kube.ChildConflict, match="Deployment default/web exists and is not owned"):
        await apply(cluster, deployment(replicas=4))
    assert cluster.writes(mark) == []


async def test_prune_deletes_only_what_it_owns(cluster) -> None:
    await apply(cluster, deployment())
    other = deployment()
    other["metadata"].update(name="other", ownerReferences=[])
    await apply(cluster, other)
    keys = [("apps/v1", "Deployment", "web"), ("apps/v1", "Deployment", "other"),
            ("apps/v1", "Deployment", "absent"), ("monitoring.coreos.com/v1", "ServiceMonitor", "web")]
    deleted = await asyncio.to_thread(kube.prune, cluster.api, keys, "default", UID)
    assert deleted == ["Deployment/web"]
    assert cluster.get("apps/v1/deployments", "web") is None
    assert cluster.get("apps/v1/deployments", "other") is not None


def test_merge_patch() -> None:
    old = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "e": 5}
    new = {"a": 1, "b": {"c": 3, "d": [1]}, "f": {"g": 1}}
    assert kube.merge_patch(old, new) == {"b": {"c": 3, "d": [1]}, "e": None, "f": {"g": 1}}
    assert kube.merge_patch(old, old) == {}


async def test_peering_objects_are_created_once(cluster) -> None:
    assert await asyncio.to_thread(kube.ensure_peering, cluster.api, "pdserve", ("llm", "team-*")) == []
    assert cluster.get("kopf.dev/v1/kopfpeerings", "pdserve", "llm") is not None
    assert await asyncio.to_thread(kube.ensure_peering, cluster.api, "pdserve", ()) == []
    assert cluster.get("kopf.dev/v1/clusterkopfpeerings", "pdserve", None) is not None
    mark = cluster.mark()
    assert await asyncio.to_thread(kube.ensure_peering, cluster.api, "pdserve", ()) == []
    assert [r.method.value for r in list(cluster.server)[mark:]] == ["GET"]  # exists: nothing written


def generated_secret(rotation: str = "", owned: bool = True) -> dict:
    from pdserve.operator import secrets

    obj = secrets.secret_object("chat-cluster-secret", "default", {"app": "chat"}, rotation)
    if owned:
        obj["metadata"]["ownerReferences"] = deployment()["metadata"]["ownerReferences"]
    return obj


async def test_a_generated_secret_is_written_once_and_regenerated_only_on_rotation(cluster) -> None:
    values = ["second", "first"]

    def ensure(obj: dict) -> str:
        return kube.ensure_secret(cluster.api, obj, UID, lambda name: {c.CLUSTER_SECRET_KEY: values.pop()})

    assert await asyncio.to_thread(ensure, generated_secret()) == "created"
    live = cluster.get("v1/secrets", "chat-cluster-secret")
    assert live["data"] == {c.CLUSTER_SECRET_KEY: "Zmlyc3Q="}  # base64 of "first"
    mark = cluster.mark()
    assert await asyncio.to_thread(ensure, generated_secret()) == "unchanged"
    assert cluster.writes(mark) == []
    assert await asyncio.to_thread(ensure, generated_secret(rotation="r1")) == "patched"
    live = cluster.get("v1/secrets", "chat-cluster-secret")
    assert live["data"] == {c.CLUSTER_SECRET_KEY: "c2Vjb25k"}  # "second"
    assert live["metadata"]["annotations"][c.ANNOTATION_ROTATE_SECRETS] == "r1" and values == []


async def test_a_users_secret_of_the_same_name_is_never_overwritten(cluster) -> None:
    await asyncio.to_thread(kube.ensure_secret, cluster.api, generated_secret(owned=False), UID,
                            lambda name: {"k": "theirs"})
    mark = cluster.mark()
    with pytest.raises(kube.ChildConflict, match="Secret default/chat-cluster-secret exists and is not owned"):
        await asyncio.to_thread(kube.ensure_secret, cluster.api, generated_secret(), UID, lambda name: {"k": "ours"})
    assert cluster.writes(mark) == []
