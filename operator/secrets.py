"""The Secrets the operator generates per InferenceService: the cluster secret and the managed Redis's password.

Rendering stays pure: :func:`secret_objects` returns the Secrets *without* their values (``pdserve operator
render`` prints them so), and :func:`generate` makes the values only when the handler creates a Secret
(:func:`pdserve.operator.kube.ensure_secret`). A Secret is written once and never regenerated on later
reconciles -- a new value would break every pod still holding the old one -- except on purpose: changing the
InferenceService's ``secrets.pdserve.io/rotation`` annotation regenerates both Secrets and, because the same value
is copied onto the pod templates, restarts every pod with the new ones.

What each secret protects (docs/security.md): the cluster secret signs router -> pod calls, decode -> prefill KV
calls, KV handles and the MACs of stored KV blocks, and seeds the block hash; the Redis password keeps anyone
else on the pod network out of the managed Redis.
"""

from __future__ import annotations

import secrets as _random
from typing import Any

from pdserve.operator import constants as c

Obj = dict[str, Any]

CLUSTER_SECRET_SUFFIX = "-cluster-secret"
REDIS_SECRET_SUFFIX = "-redis-auth"


def cluster_secret_name(name: str) -> str:
    return name + CLUSTER_SECRET_SUFFIX


def redis_secret_name(name: str) -> str:
    return name + REDIS_SECRET_SUFFIX


def secret_object(name: str, namespace: str, labels: dict[str, str], rotation: str) -> Obj:
    """One generated Secret as rendered: metadata (with the keys it will hold) and type; the handler adds ``data``
    when it creates it."""
    keys = c.CLUSTER_SECRET_KEY if name.endswith(CLUSTER_SECRET_SUFFIX) else c.REDIS_PASSWORD_KEY
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "annotations": {c.ANNOTATION_ROTATE_SECRETS: rotation, c.ANNOTATION_SECRET_KEYS: keys}}}


def generate(secret_name: str) -> dict[str, str]:
    """Fresh values for the generated Secret ``secret_name`` (plain text; the caller encodes them)."""
    if secret_name.endswith(CLUSTER_SECRET_SUFFIX):
        from pdserve.engine.security import ClusterSecret

        return {c.CLUSTER_SECRET_KEY: ClusterSecret.generate().to_text()}
    if secret_name.endswith(REDIS_SECRET_SUFFIX):
        # URL-safe, so it survives redis-cli and URLs if someone must type it; 256 bits.
        return {c.REDIS_PASSWORD_KEY: _random.token_urlsafe(32)}
    raise ValueError(f"the operator generates no Secret called {secret_name!r}")
