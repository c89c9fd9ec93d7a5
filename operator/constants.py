"""Names every part of the operator (and the Helm chart, and the router's discovery) agrees on."""

from __future__ import annotations

GROUP = "pdserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SHORT_NAME = "pdis"

# Roles that run as Deployments. "redis" only exists when the spec asks for a managed Redis.
ENGINE_ROLES = ("prefill", "decode")
ROLES = ("prefill", "decode", "router")

# Labels. The first two select a role's pods (Deployment selectors, Services, the router's discovery) and so
# must never change for an existing object: Deployment selectors are immutable.
LABEL_SERVICE = "pdserve.io/service"
LABEL_ROLE = "pdserve.io/role"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_METRICS = "pdserve.io/metrics"
MANAGED_BY = "pdserve-operator"

# Annotations.
ANNOTATION_CONFIG_HASH = "pdserve.io/config-hash"  # on pod templates: a config change rolls the pods
ANNOTATION_LAST_APPLIED = "pdserve.io/last-applied"  # on children: what the operator last wrote, for diffs
# On an InferenceService: change its value to regenerate the generated Secrets (cluster secret, Redis password);
# the value is copied onto the Secrets and the pod templates, so every pod restarts with the new secret. Not
# under "pdserve.io/": kopf keeps its own records there and ignores changes to those annotations.
ANNOTATION_ROTATE_SECRETS = "secrets.pdserve.io/rotation"
ANNOTATION_SECRET_KEYS = "secrets.pdserve.io/keys"  # on a generated Secret: the keys the operator fills in

# Ports and paths inside the pods.
HTTP_PORT = 8000
GRPC_PORT = 50051
KV_PORT = 50052  # the grpc connector: a prefill pod's KV block server, pulled by decode pods
KV_EVENTS_PORT = 5557  # an engine's KV event publisher; the router finds it by the port name "kv-events"
REDIS_PORT = 6379
METRICS_PORT = 9090  # /metrics on its own listener, so NetworkPolicies can open it to Prometheus alone
# On the operator's pods (the chart sets it): the autoscaler scrapes the engines' metrics port, so an autoscaled
# service's NetworkPolicies admit pods with this label there too.
LABEL_METRICS_READER = "pdserve.io/metrics-reader"
CONFIG_DIR = "/etc/pdserve"
KV_DIR = "/var/lib/pdserve/kv"
MODEL_DIR = "/models"
TMP_DIR = "/tmp"

# Keys of the generated Secrets and the environment variables the pods read them from (engine/security.py,
# the Redis connector).
CLUSTER_SECRET_KEY = "cluster-secret"
CLUSTER_SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
REDIS_PASSWORD_KEY = "password"
REDIS_PASSWORD_ENV = "PDSERVE_REDIS_PASSWORD"
API_KEY_ENV = "PDSERVE_API_KEY"

# The user the image runs as (see the Dockerfile); pods run as this user, never as root.
RUN_AS_USER = 10001
REDIS_RUN_AS_USER = 999  # the official redis image's "redis" user

DEFAULT_IMAGE = "ghcr.io/pdserve/pdserve:0.1.0"
DEFAULT_REDIS_IMAGE = "redis:7.4-alpine"

# Longest InferenceService name: "<name>-prefill" must fit a 63-character DNS label (Service names), with room.
MAX_NAME_LENGTH = 50
