"""Pod discovery: a static list (local runs) or Kubernetes pods selected by label, followed with a watch.

Discovery only keeps the pod table's membership right; whether a pod gets traffic is the health checker's call.

Static entries (``--prefill`` / ``--decode``) read ``ADDRESS[,key=value...]``: ``grpc://host:port`` or
``host:port`` is the pod's gRPC address; ``http://...`` its HTTP URL (then ``grpc=host:port`` is needed too);
options ``grpc=``, ``events=tcp://host:port`` (its KV event publisher), ``http=`` and ``name=``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pdserve.services.router.state import PodTable
from pdserve.services.router.types import Endpoint, Role

logger = logging.getLogger(__name__)

_OPTIONS = {"grpc", "events", "http", "name"}


def parse_static_entry(text: str, role: Role, index: int) -> Endpoint:
    """One ``--prefill`` / ``--decode`` value as an endpoint; ``ValueError`` with the entry named."""
    head, *rest = [part.strip() for part in text.split(",")]
    opts: dict[str, str] = {}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep or key not in _OPTIONS or not value:
            raise ValueError(f"bad pod entry {text!r}: options are {', '.join(sorted(_OPTIONS))} as key=value")
        opts[key] = value
    url = urlparse(head if "://" in head else f"grpc://{head}")
    if not url.hostname or not url.port:
        raise ValueError(f"bad pod entry {text!r}: expected host:port, grpc://host:port or http://host:port")
    if url.scheme == "grpc":
        grpc_target = f"{url.hostname}:{url.port}"
        http = opts.get("http", "")
    elif url.scheme in ("http", "https"):
        grpc_target = opts.get("grpc", "")
        http = head
    else:
        raise ValueError(f"bad pod entry {text!r}: unknown scheme {url.scheme!r}")
    if not grpc_target:
        raise ValueError(f"bad pod entry {text!r}: the router talks gRPC to pods; add grpc=host:port")
    events = opts.get("events")
    if events is not None and not events.startswith(("tcp://", "ipc://")):
        raise ValueError(f"bad pod entry {text!r}: events must be a ZeroMQ address (tcp://host:port)")
    name = opts.get("name") or f"{role.value}-{index}"
    return Endpoint(name=name, role=role, url=http, grpc_target=grpc_target, kv_events=events)


def static_endpoints(prefill: Sequence[str], decode: Sequence[str], both: Sequence[str] = ()) -> list[Endpoint]:
    endpoints = [parse_static_entry(t, Role.PREFILL, i) for i, t in enumerate(prefill)]
    endpoints += [parse_static_entry(t, Role.DECODE, i) for i, t in enumerate(decode)]
    endpoints += [parse_static_entry(t, Role.BOTH, i) for i, t in enumerate(both)]
    names = [e.name for e in endpoints]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"two pods are named {dup!r}")
    return endpoints


class StaticDiscovery:
    """A fixed set of pods."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)

    async def run(self, table: PodTable) -> None:
        table.replace_all(self.endpoints)


@dataclass(frozen=True)
class PodPorts:
    """Default ports of pods found in Kubernetes; a container port named ``http`` / ``grpc`` / ``kv-events``
    overrides them per pod."""

    http: int = 8000
    grpc: int = 50051
    kv_events: int | None = 5557


def endpoint_from_pod(pod: Mapping[str, Any], role: Role, ports: PodPorts) -> Endpoint | None:
    """A pod object (as a dict) as an endpoint; None while it has no IP, is terminating or not Ready."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or meta.get("deletionTimestamp") or status.get("phase") not in (None, "Running"):
        return None
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conditions.get("Ready", "True") != "True":
        return None
    named = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name"):
                named[port["name"]] = int(port["containerPort"])
    http, grpc = named.get("http", ports.http), named.get("grpc", ports.grpc)
    events = named.get("kv-events", ports.kv_events)
    host = f"[{ip}]" if ":" in ip else ip
    return Endpoint(name=meta["name"], role=role, url=f"http://{host}:{http}", grpc_target=f"{host}:{grpc}",
                    kv_events=f"tcp://{host}:{events}" if events else None, labels=dict(meta.get("labels") or {}))


def _matches(labels: Mapping[str, str], selector: str) -> bool:
    """Equality-based label selectors (``a=b,c=d``, ``a!=b``, ``a``); the server filters too, this guards."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.strip().rstrip("=")) != value.strip():
                return False
        elif term not in labels:
            return False
    return True


class KubernetesDiscovery:
    """Follows pods matching a label selector per role with list + watch (the ``kubernetes`` client).

    The client is synchronous, so each role's watch runs in a thread and hands events to the event loop. A
    watch that breaks (API server restart, expired resource version) is restarted after a full re-list, so no
    pod change is missed for long.
    """

    def __init__(self, namespace: str, selectors: Mapping[Role, str], ports: PodPorts = PodPorts(),
                 api_client: Any = None, watch_timeout_s: int = 300, retry_s: float = 2.0) -> None:
        self.namespace = namespace
        self.selectors = {role: sel for role, sel in selectors.items() if sel}
        self.ports = ports
        self.api_client = api_client
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._watches: list[Any] = []

    def _core_api(self) -> Any:
        from kubernetes import client, config

        if self.api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self.api_client = client.ApiClient()
        return client.CoreV1Api(self.api_client)

    async def run(self, table: PodTable) -> None:
        """Keep ``table`` in step with the cluster until cancelled."""
        api = self._core_api()
        loop = asyncio.get_running_loop()
        ended = []
        for role, selector in self.selectors.items():
            fut = loop.create_future()
            ended.append(fut)
            # Daemon threads, not the loop's executor: a watch blocked on a quiet stream must not hold up exit.
            threading.Thread(target=self._thread_main, args=(api, role, selector, table, loop, fut), daemon=True,
                             name=f"k8s-watch-{role.value}").start()
        try:
            await asyncio.gather(*ended)
        finally:
            self._stop.set()
            for w in list(self._watches):
                w.stop()

    def _thread_main(self, api: Any, role: Role, selector: str, table: PodTable, loop: asyncio.AbstractEventLoop,
                     ended: asyncio.Future) -> None:
        try:
            self._follow(api, role, selector, table, loop)
        finally:
            try:
                loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))
            except RuntimeError:
                pass  # the loop is already closed

    def _follow(self, api: Any, role: Role, selector: str, table: PodTable, loop: asyncio.AbstractEventLoop) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                # Raw JSON: the same dict shape as the watch's raw objects, without the client's model classes.
                listed = api.list_namespaced_pod(self.namespace, label_selector=selector, _preload_content=False)
                items = json.loads(listed.data).get("items", [])
                loop.call_soon_threadsafe(self._resync, table, role, items, selector)
                w = watch.Watch()
                self._watches.append(w)
                try:
                    for event in w.stream(api.list_namespaced_pod, self.namespace, label_selector=selector,
                                          timeout_seconds=self.watch_timeout_s,
                                          _request_timeout=self.watch_timeout_s + 30):
                        if self._stop.is_set():
                            break
                        obj = event.get("raw_object") or {}
                        loop.call_soon_threadsafe(self._apply, table, role, event.get("type"), obj, selector)
                finally:
                    self._watches.remove(w)
            except Exception as exc:  # the API server went away, a watch expired...: back off, re-list
                if self._stop.is_set():
                    return
                logger.warning("kubernetes watch for %s pods (%s) failed: %s; retrying", role.value, selector, exc)
                self._stop.wait(self.retry_s)

    def _resync(self, table: PodTable, role: Role, items: list[dict], selector: str) -> None:
        """Full re-list: add what is there, drop this role's pods that are not."""
        present = set()
        for obj in items:
            if _matches((obj.get("metadata") or {}).get("labels") or {}, selector):
                endpoint = endpoint_from_pod(obj, role, self.ports)
                if endpoint is not None:
                    table.upsert(endpoint)
                    present.add(endpoint.name)
        for pod in table.all():
            if pod.role == role and pod.name not in present:
                table.remove(pod.name)

    def _apply(self, table: PodTable, role: Role, kind: str | None, obj: dict, selector: str) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name:
            return
        endpoint = endpoint_from_pod(obj, role, self.ports) if _matches(meta.get("labels") or {}, selector) else None
        if kind == "DELETED" or endpoint is None:
            existing = table.get(name)
            if existing is not None and existing.role == role:
                table.remove(name)
        else:
            table.upsert(endpoint)
