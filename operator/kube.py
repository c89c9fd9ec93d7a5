"""Kubernetes I/O with the official ``kubernetes`` client: create-or-patch, prune, read children, write status.

Create-or-patch works like ``kubectl apply`` with a private annotation: each child carries the JSON that the
operator last wrote (``pdserve.io/last-applied``). A new rendering is compared with it; when equal nothing is sent,
otherwise a JSON merge patch of exactly the differences is sent (keys the operator stopped writing become null).
Fields that others own -- defaults filled in by the API server, status, a user's extra annotation -- are never
touched, and an unchanged spec causes no write at all.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import kubernetes
from kubernetes.client import ApiException

from pdserve.operator import constants as c
from pdserve.operator.render import canonical_json

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


class ChildConflict(RuntimeError):
    """A child's name is taken by an object that this InferenceService does not own."""


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account when running in a pod, otherwise the kubeconfig (``$KUBECONFIG``)."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        # Read $KUBECONFIG now: the client library's own default was frozen when it was imported.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
    return cfg


def connection_info(cfg: kubernetes.client.Configuration) -> Any:
    """The same credentials for kopf's own HTTP client, as a ``kopf.ConnectionInfo``."""
    import kopf

    # The in-cluster token rotates; the client's refresh hook runs inside get_api_key_with_prefix.
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
                               username=cfg.username or None, password=cfg.password or None,
                               scheme=scheme or None, token=token or None,
                               certificate_path=cfg.cert_file, private_key_path=cfg.key_file)


def new_api_client() -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(load_configuration())


@dataclass(frozen=True)
class _Verbs:
    read: Callable[..., Any]
    create: Callable[..., Any]
    patch: Callable[..., Any]
    delete: Callable[..., Any]


def _verbs(api: kubernetes.client.ApiClient, api_version: str, kind: str) -> _Verbs:
    """The typed client methods for one kind (custom resources go through CustomObjectsApi)."""
    typed = {
        ("v1", "ConfigMap"): (kubernetes.client.CoreV1Api, "namespaced_config_map"),
        ("v1", "Service"): (kubernetes.client.CoreV1Api, "namespaced_service"),
        ("v1", "ServiceAccount"): (kubernetes.client.CoreV1Api, "namespaced_service_account"),
        ("v1", "Secret"): (kubernetes.client.CoreV1Api, "namespaced_secret"),
        ("networking.k8s.io/v1", "NetworkPolicy"): (kubernetes.client.NetworkingV1Api, "namespaced_network_policy"),
        ("apps/v1", "Deployment"): (kubernetes.client.AppsV1Api, "namespaced_deployment"),
        ("policy/v1", "PodDisruptionBudget"): (kubernetes.client.PolicyV1Api, "namespaced_pod_disruption_budget"),
        ("rbac.authorization.k8s.io/v1", "Role"): (kubernetes.client.RbacAuthorizationV1Api, "namespaced_role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"): (kubernetes.client.RbacAuthorizationV1Api,
                                                          "namespaced_role_binding"),
    }
    if (api_version, kind) in typed:
        cls, suffix = typed[(api_version, kind)]
        client = cls(api)
        return _Verbs(read=lambda ns, name: getattr(client, f"read_{suffix}")(name, ns),
                      create=lambda ns, body: getattr(client, f"create_{suffix}")(ns, body),
                      patch=lambda ns, name, body: getattr(client, f"patch_{suffix}")(
                          name, ns, body, _content_type=MERGE_PATCH),
                      delete=lambda ns, name: getattr(client, f"delete_{suffix}")(name, ns))
    if (api_version, kind) == ("monitoring.coreos.com/v1", "ServiceMonitor"):
        custom = kubernetes.client.CustomObjectsApi(api)
        g, v, p = "monitoring.coreos.com", "v1", "servicemonitors"
        return _Verbs(read=lambda ns, name: custom.get_namespaced_custom_object(g, v, ns, p, name),
                      create=lambda ns, body: custom.create_namespaced_custom_object(g, v, ns, p, body),
                      patch=lambda ns, name, body: custom.patch_namespaced_custom_object(
                          g, v, ns, p, name, body, _content_type=MERGE_PATCH),
                      delete=lambda ns, name: custom.delete_namespaced_custom_object(g, v, ns, p, name))
    raise ValueError(f"the operator does not manage {kind} ({api_version})")


def to_dict(api: kubernetes.client.ApiClient, obj: Any) -> Obj:
    """A client model (or a dict from CustomObjectsApi) as the plain JSON dict the API server sent."""
    return obj if isinstance(obj, dict) else api.sanitize_for_serialization(obj)


def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 JSON merge patch that turns ``old`` into ``new`` (lists are replaced whole, as RFC 7386 says)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: Obj = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


def _owned_by(live: Obj, owner_uid: str) -> bool:
    return any(ref.get("uid") == owner_uid for ref in (live.get("metadata") or {}).get("ownerReferences") or [])


def _read(verbs: _Verbs, api: kubernetes.client.ApiClient, ns: str, name: str) -> Obj | None:
    try:
        return to_dict(api, verbs.read(ns, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def apply(api: kubernetes.client.ApiClient, obj: Obj, owner_uid: str) -> str:
    """Create ``obj`` or patch what changed since the operator last wrote it; returns created|patched|unchanged.

    A 409 on create (someone created it meanwhile) and a 404 on patch (someone deleted it meanwhile) are part of
    the normal race and are resolved here; an object of the same name that ``owner_uid`` does not own raises
    :class:`ChildConflict` instead of being taken over.
    """
    meta = obj["metadata"]
    ns, name = meta["namespace"], meta["name"]
    verbs = _verbs(api, obj["apiVersion"], obj["kind"])
    applied_json = canonical_json(obj)
    desired = json.loads(applied_json)
    desired["metadata"].setdefault("annotations", {})[c.ANNOTATION_LAST_APPLIED] = applied_json

    def patch_for(live: Obj) -> Obj | None:
        last = ((live.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_LAST_APPLIED)
        if last == applied_json:
            return None
        previous = json.loads(last) if last else {}
        previous.setdefault("metadata", {}).setdefault("annotations", {})[c.ANNOTATION_LAST_APPLIED] = last
        return merge_patch(previous, desired)

    return _create_or_patch(verbs, api, obj["kind"], ns, name, owner_uid, lambda: desired, patch_for)


def _create_or_patch(verbs: Any, api: kubernetes.client.ApiClient, kind: str, ns: str, name: str, owner_uid: str,
                     create_body: Callable[[], Obj], patch_for: Callable[[Obj], Obj | None]) -> str:
    """The race-tolerant create-or-patch loop behind :func:`apply` and :func:`ensure_secret`.

    ``patch_for(live)`` returns the patch to send, or None when the live object is already as wanted. A 409 on
    create and a 404 on patch mean someone else changed the object meanwhile: read it again (three tries)."""
    for _ in range(3):
        live = _read(verbs, api, ns, name)
        if live is None:
            try:
                verbs.create(ns, create_body())
                return "created"
            except ApiException as exc:
                if exc.status != 409:
                    raise
                continue
        if not _owned_by(live, owner_uid):
            raise ChildConflict(f"{kind} {ns}/{name} exists and is not owned by this InferenceService")
        patch = patch_for(live)
        if patch is None:
            return "unchanged"
        try:
            verbs.patch(ns, name, patch)
            return "patched"
        except ApiException as exc:
            if exc.status != 404:
                raise
    raise RuntimeError(f"{kind} {ns}/{name} kept changing under the operator; will retry")


def ensure_secret(api: kubernetes.client.ApiClient, obj: Obj, owner_uid: str,
                  generate: Callable[[str], dict[str, str]]) -> str:
    """Create the generated Secret ``obj`` once; returns created|patched|unchanged.

    An existing Secret keeps its values -- they are never regenerated by a reconcile, only when the rotation
    annotation of ``obj`` differs from the live one (or a key that ``obj`` lists in its
    ``secrets.pdserve.io/keys`` annotation is missing): then every key gets a fresh value from ``generate(name)``.
    Values are sent base64-encoded in ``data`` (what the API server stores either way).
    """
    meta = obj["metadata"]
    ns, name = meta["namespace"], meta["name"]
    verbs = _verbs(api, "v1", "Secret")
    rotation = (meta.get("annotations") or {}).get(c.ANNOTATION_ROTATE_SECRETS, "")

    def encoded() -> dict[str, str]:
        return {k: base64.b64encode(v.encode()).decode() for k, v in generate(name).items()}

    keys = (meta.get("annotations") or {}).get(c.ANNOTATION_SECRET_KEYS, "").split(",")

    def patch_for(live: Obj) -> Obj | None:
        live_rotation = ((live.get("metadata") or {}).get("annotations") or {}).get(c.ANNOTATION_ROTATE_SECRETS, "")
        if live_rotation == rotation and set(keys) <= set(live.get("data") or {}):
            return None
        return {"metadata": {"annotations": {c.ANNOTATION_ROTATE_SECRETS: rotation}}, "data": encoded()}

    return _create_or_patch(verbs, api, "Secret", ns, name, owner_uid,
                            lambda: {**json.loads(canonical_json(obj)), "data": encoded()}, patch_for)


def prune(api: kubernetes.client.ApiClient, keys: list[tuple[str, str, str]], namespace: str,
          owner_uid: str) -> list[str]:
    """Delete the children in ``keys`` that exist and are owned by ``owner_uid``; returns what was deleted."""
    deleted: list[str] = []
    for api_version, kind, name in keys:
        verbs = _verbs(api, api_version, kind)
        try:
            live = _read(verbs, api, namespace, name)
        except ApiException as exc:
            if exc.status == 404:  # the kind itself is not served (e.g. no Prometheus operator): nothing to prune
                continue
            raise
        if live is not None and _owned_by(live, owner_uid):
            try:
                verbs.delete(namespace, name)
                deleted.append(f"{kind}/{name}")
            except ApiException as exc:
                if exc.status != 404:
                    raise
    return deleted


def read_deployment(api: kubernetes.client.ApiClient, namespace: str, name: str) -> Obj | None:
    return _read(_verbs(api, "apps/v1", "Deployment"), api, namespace, name)


def scale_deployment(api: kubernetes.client.ApiClient, namespace: str, name: str, replicas: int) -> None:
    """Set a Deployment's replicas (the autoscaler). Only ``spec.replicas`` changes, so the last-applied
    annotation still holds the rendered count and a later reconcile leaves the autoscaler's value alone."""
    _verbs(api, "apps/v1", "Deployment").patch(namespace, name, {"spec": {"replicas": replicas}})


def read_inference_service(api: kubernetes.client.ApiClient, namespace: str, name: str) -> Obj | None:
    custom = kubernetes.client.CustomObjectsApi(api)
    try:
        return custom.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def ensure_peering(api: kubernetes.client.ApiClient, name: str, namespaces: tuple[str, ...]) -> list[str]:
    """Create the kopf peering object(s) when missing; returns the problems (empty when all exist).

    kopf never creates them, and a replica with mandatory peering and no peering object waits forever -- an
    operator that silently does nothing. The chart creates them; this covers ``pdserve operator run`` elsewhere.
    """
    custom = kubernetes.client.CustomObjectsApi(api)
    problems = []
    if namespaces:  # one per namespace; kopf's namespace globs ("team-*") name no namespace to create it in
        targets = [(ns, "KopfPeering", "kopfpeerings") for ns in namespaces if not set(ns) & set("*?[!")]
    else:
        targets = [(None, "ClusterKopfPeering", "clusterkopfpeerings")]
    for ns, kind, plural in targets:
        body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
        try:
            if ns is None:
                custom.get_cluster_custom_object("kopf.dev", "v1", plural, name)
            else:
                custom.get_namespaced_custom_object("kopf.dev", "v1", ns, plural, name)
            continue
        except ApiException as exc:
            if exc.status != 404:
                problems.append(f"cannot read {kind} {name}: {exc.status} {exc.reason}")
                continue
        try:
            if ns is None:
                custom.create_cluster_custom_object("kopf.dev", "v1", plural, body)
            else:
                custom.create_namespaced_custom_object("kopf.dev", "v1", ns, plural, body)
        except ApiException as exc:
            if exc.status != 409:
                problems.append(f"cannot create {kind} {name} (is the kopf.dev CRD installed?): "
                                f"{exc.status} {exc.reason}")
    return problems


def patch_status(api: kubernetes.client.ApiClient, namespace: str, name: str, status: Obj) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object_status(c.GROUP, c.VERSION, namespace, c.PLURAL, name, {"status": status},
                                                 _content_type=MERGE_PATCH)
