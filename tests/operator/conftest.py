"""A real kopf operator with the real kubernetes client against kmock's in-memory Kubernetes API.

kmock's emulator stores objects and streams watch events but leaves the API server's bookkeeping to us:
:class:`FakeApiServer` adds uid, resourceVersion, generation and creationTimestamp. The Deployment controller and
the garbage collector are played by explicit helpers (:meth:`Cluster.roll_out`, :meth:`Cluster.collect_garbage`)
so each test says when "the cluster" acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import kmock
import kubernetes
import pytest
import yaml

from pdserve.operator import constants as c
from pdserve.operator.handlers import OperatorOptions
from pdserve.operator.runner import run_operator

ISVC = f"{c.GROUP}/{c.VERSION}/{c.PLURAL}"
# resource -> (kind, namespaced, subresources)
RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "v1/namespaces": ("Namespace", False, ()),
    "v1/events": ("Event", True, ()),
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/services": ("Service", True, ()),
    "v1/serviceaccounts": ("ServiceAccount", True, ()),
    "v1/secrets": ("Secret", True, ()),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, ()),
    "apps/v1/deployments": ("Deployment", True, ("status",)),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, ("status",)),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, ()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, ()),
    "monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", True, ()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ()),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, ()),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, ()),
    ISVC: (c.KIND, True, ("status",)),
}
CHILD_RESOURCES = [r for r in RESOURCES if r.split("/")[-1] in {
    "configmaps", "services", "serviceaccounts", "deployments", "poddisruptionbudgets", "roles", "rolebindings",
    "servicemonitors", "secrets", "networkpolicies"}]
WRITES = {"POST", "PATCH", "PUT", "DELETE"}


class FakeApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata a real API server maintains (and ``generateName``)."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict) and request.action in (
                kmock.action.CREATE, kmock.action.UPDATE):
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._versions))
            if request.action == kmock.action.CREATE:
                now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=now)
                if not meta.get("name") and meta.get("generateName"):  # e.g. kopf's Events
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            elif "spec" in data and request.subresource is None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    meta["generation"] = (self.objects[key].get("metadata", {}).get("generation") or 0) + 1
        return await super()._handle(request)


class Cluster:
    """The test's side of the fake cluster: the kubernetes client, object lookups and request history."""

    def __init__(self, server: FakeApiServer, api: kubernetes.client.ApiClient, namespace: str = "default") -> None:
        self.server, self.api, self.namespace = server, api, namespace
        self.url = str(server.url).rstrip("/")

    # --- objects -------------------------------------------------------------------------------------------------
    def get(self, resource: str, name: str, namespace: str | None = "default") -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.server.objects or self.server.objects[key].deleted:
            return None
        return _plain(self.server.objects[key].raw)

    def isvc(self, name: str) -> dict[str, Any] | None:
        return self.get(ISVC, name, self.namespace)

    def children(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(kind, name) -> object, for every live object of a kind the operator creates."""
        out = {}
        for (res, _ns, name), obj in self.server.objects.items():
            if f"{res.group}/{res.version}/{res.plural}".lstrip("/") in CHILD_RESOURCES and not obj.deleted:
                raw = _plain(obj.raw)
                out[(raw["kind"], name)] = raw
        return out

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [_plain(obj.raw) for (res, _ns, _name), obj in self.server.objects.items()
                if res.plural == "events" and not obj.deleted and obj.raw.get("reason") == reason]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)

    # --- requests ------------------------------------------------------------------------------------------------
    def mark(self) -> int:
        return len(list(self.server))

    def writes(self, since: int) -> list[tuple[str, str, str, Any]]:
        """(method, plural, name, body) of each write to a child resource since ``mark()``."""
        out = []
        for req in list(self.server)[since:]:
            res = req.resource
            if req.method.value in WRITES and res is not None and res.plural in {r.split("/")[-1] for r in
                                                                                  CHILD_RESOURCES}:
                # The raw body: FakeApiServer adds its bookkeeping to the parsed data, not to what was sent.
                sent = json.loads(req.body) if req.body else None
                out.append((req.method.value, res.plural, req.name or (sent or {}).get("metadata", {}).get("name"),
                            sent))
        return out

    # --- the user's and the cluster's actions ---------------------------------------------------------------------
    async def create_isvc(self, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None,
                          annotations: dict[str, str] | None = None) -> dict[str, Any]:
        meta = {"name": name, "namespace": self.namespace, "labels": labels or {}, "annotations": annotations or {}}
        body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": meta, "spec": spec}
        custom = kubernetes.client.CustomObjectsApi(self.api)
        await asyncio.to_thread(custom.create_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace,
                                c.PLURAL, body)
        created = self.isvc(name)
        assert created is not None
        return created

    async def patch_isvc(self, name: str, patch: dict[str, Any]) -> None:
        custom = kubernetes.client.CustomObjectsApi(self.api)
        await asyncio.to_thread(custom.patch_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.PLURAL,
                                name, patch, _content_type="application/merge-patch+json")

    async def delete_isvc(self, name: str) -> None:
        custom = kubernetes.client.CustomObjectsApi(self.api)
        await asyncio.to_thread(custom.delete_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace,
                                c.PLURAL, name)

    def peers(self, name: str) -> list[str]:
        """Identities of the live replicas registered in a peering object."""
        obj = self.get("kopf.dev/v1/clusterkopfpeerings", name, None) or {}
        return [k for k, v in (obj.get("status") or {}).items() if v and v.get("lifetime", 1) > 0]

    async def roll_out(self) -> None:
        """Play the Deployment controller: every Deployment has all its pods updated and ready."""
        apps = kubernetes.client.AppsV1Api(self.api)
        for (kind, name), dep in self.children().items():
            if kind != "Deployment":
                continue
            n = dep["spec"].get("replicas", 1)
            status = {"observedGeneration": dep["metadata"]["generation"], "replicas": n, "readyReplicas": n,
                      "updatedReplicas": n, "availableReplicas": n}
            await asyncio.to_thread(apps.patch_namespaced_deployment_status, name, self.namespace,
                                    {"status": status}, _content_type="application/merge-patch+json")

    async def collect_garbage(self) -> list[str]:
        """Play the garbage collector: delete objects whose every owner is gone."""
        live_uids = {o.raw["metadata"]["uid"] for o in self.server.objects.values() if not o.deleted}
        deleted = []
        async with aiohttp_session() as session:
            for (res, ns, name), obj in list(self.server.objects.items()):
                refs = [] if obj.deleted else obj.raw.get("metadata", {}).get("ownerReferences") or []
                if refs and not any(ref["uid"] in live_uids for ref in refs):
                    group = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
                    await session.delete(f"{self.url}{group}/namespaces/{ns}/{res.plural}/{name}")
                    deleted.append(f"{res.plural}/{name}")
        return deleted


def _plain(value: Any) -> Any:
    """kmock's views as plain dicts and lists (for ``==`` and json)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def aiohttp_session() -> Any:
    import aiohttp

    return aiohttp.ClientSession()


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """An empty fake cluster; KUBECONFIG points the operator (and kopf) at it."""
    # If the tests run inside a pod, in-cluster credentials must not win over the fake cluster.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with FakeApiServer() as server, kmock.Server(server):
        for resource, (kind, namespaced, subresources) in RESOURCES.items():
            server.resources[resource] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, subresources=subresources,
                verbs=["get", "list", "watch", "create", "patch", "update", "delete"])
        url = str(server.url).rstrip("/")
        kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                      "clusters": [{"name": "fake", "cluster": {"server": url}}],
                      "users": [{"name": "fake", "user": {}}],
                      "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(path))
        cfg = kubernetes.client.Configuration()
        cfg.host = url
        with kubernetes.client.ApiClient(cfg) as api:
            yield Cluster(server, api)


@pytest.fixture
def operator_running() -> Callable[..., contextlib.AbstractAsyncContextManager[None]]:
    """``async with operator_running(**options):`` runs the real operator (see :func:`running_operator`)."""
    return running_operator


@contextlib.asynccontextmanager
async def running_operator(**options: Any) -> AsyncIterator[None]:
    """Run the real operator until the block exits, in a thread with its own event loop (as in a real process):
    kopf then waits only for its own tasks at exit, and the fake API server keeps serving it meanwhile."""
    opts = OperatorOptions(**{"peering": None, "status_interval": 0.3, **options})
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(run_operator(opts, stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # surfaced in the test below
            errors.append(exc)

    thread = threading.Thread(target=main, name="pdserve-operator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not ready.is_set() and thread.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    try:
        if errors or not ready.is_set():
            raise AssertionError(f"the operator did not start: {errors}")
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive(), "the operator did not stop"
    if errors:
        raise errors[0]
