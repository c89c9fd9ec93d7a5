"""Kubernetes discovery against an in-memory Kubernetes API (kmock): pods appear, turn unready, disappear."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

pytest.importorskip("kmock")
kubernetes = pytest.importorskip("kubernetes")

from pdserve.services.router.discovery import KubernetesDiscovery, PodPorts, endpoint_from_pod  # noqa: E402
from pdserve.services.router.state import PodTable  # noqa: E402
from pdserve.services.router.types import Role  # noqa: E402

NS = "llm"


def pod(name, role, ip, ready=True, labels=None, ports=None):
    labels = {"app": "pdserve", "role": role, **(labels or {})}
    containers = [{"name": "engine", "ports": ports or []}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels, "resourceVersion": "1"},
            "spec": {"containers": containers},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


async def until(predicate, timeout=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def names(table, role=None):
    return sorted(p.name for p in table.all() if role is None or p.role == role)


@pytest.mark.timeout(60)
async def test_pods_appear_change_and_disappear(kmock):
    api_client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=str(kmock.url).rstrip("/")))
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as http:
        async def create(obj):
            r = await http.post(f"/api/v1/namespaces/{NS}/pods", json=obj)
            assert r.status < 300, await r.text()

        async def patch(name, body):
            r = await http.patch(f"/api/v1/namespaces/{NS}/pods/{name}", json=body,
                                 headers={"Content-Type": "application/merge-patch+json"})
            assert r.status < 300, await r.text()

        async def delete(name):
            r = await http.delete(f"/api/v1/namespaces/{NS}/pods/{name}")
            assert r.status < 300, await r.text()

        await create(pod("decode-a", "decode", "10.0.0.1"))
        await create(pod("prefill-a", "prefill", "10.0.0.2", ports=[{"name": "grpc", "containerPort": 9000},
                                                                    {"name": "kv-events", "containerPort": 6000}]))
        await create(pod("other", "decode", "10.0.0.9", labels={"app": "someone-else"}))
        table = PodTable()
        discovery = KubernetesDiscovery(NS, {Role.DECODE: "app=pdserve,role=decode",
                                             Role.PREFILL: "app=pdserve,role=prefill"},
                                        PodPorts(grpc=50051, kv_events=5557), api_client=api_client,
                                        watch_timeout_s=30, retry_s=0.2)
        task = asyncio.create_task(discovery.run(table))
        try:
            await until(lambda: names(table) == ["decode-a", "prefill-a"])
            decode, prefill = table.get("decode-a").endpoint, table.get("prefill-a").endpoint
            assert (decode.role, decode.grpc_target, decode.kv_events) == (Role.DECODE, "10.0.0.1:50051",
                                                                           "tcp://10.0.0.1:5557")
            assert (prefill.role, prefill.grpc_target, prefill.kv_events) == (Role.PREFILL, "10.0.0.2:9000",
                                                                              "tcp://10.0.0.2:6000")
            # A new pod appears (scale-up).
            await create(pod("decode-b", "decode", "10.0.0.3"))
            await until(lambda: names(table, Role.DECODE) == ["decode-a", "decode-b"])
            # A pod turns unready: it leaves the table; ready again: it comes back.
            await patch("decode-a", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
            await until(lambda: names(table, Role.DECODE) == ["decode-b"])
            await patch("decode-a", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
            await until(lambda: names(table, Role.DECODE) == ["decode-a", "decode-b"])
            # A pod is deleted (scale-down, eviction).
            await delete("prefill-a")
            await until(lambda: names(table, Role.PREFILL) == [])
            # A restarted pod with a new IP replaces the old endpoint.
            await delete("decode-b")
            await until(lambda: names(table, Role.DECODE) == ["decode-a"])
            await create(pod("decode-b", "decode", "10.0.0.7"))
            await until(lambda: table.get("decode-b") is not None
                        and table.get("decode-b").endpoint.grpc_target == "10.0.0.7:50051")
            assert "other" not in names(table)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


ENDPOINT_CASES = [
    # (id, pod object, expected (grpc target, kv events) or None)
    ("running-ready", pod("a", "decode", "10.1.1.1"), ("10.1.1.1:50051", "tcp://10.1.1.1:5557")),
    ("not-ready", pod("a", "decode", "10.1.1.1", ready=False), None),
    ("no-ip-yet", {**pod("a", "decode", ""), "status": {"phase": "Pending"}}, None),
    ("terminating", {**pod("a", "decode", "10.1.1.1"),
                     "metadata": {"name": "a", "deletionTimestamp": "2024-01-01T00:00:00Z"}}, None),
    ("named-ports", pod("a", "decode", "10.1.1.1", ports=[{"name": "grpc", "containerPort": 1234}]),
     ("10.1.1.1:1234", "tcp://10.1.1.1:5557")),
    ("ipv6", pod("a", "decode", "fd00::5"), ("[fd00::5]:50051", "tcp://[fd00::5]:5557")),
]


@pytest.mark.parametrize("obj,expected", [c[1:] for c in ENDPOINT_CASES], ids=[c[0] for c in ENDPOINT_CASES])
def test_endpoint_from_pod(obj, expected):
    endpoint = endpoint_from_pod(obj, Role.DECODE, PodPorts())
    assert (None if endpoint is None else (endpoint.grpc_target, endpoint.kv_events)) == expected
