"""Pure rendering: one valid :class:`~pdserve.operator.spec.ServiceSpec` -> the list of child objects.

No I/O and no Kubernetes client here, so ``pdserve operator render`` prints exactly what the operator applies,
and tests compare it field by field. Owner references are added by the handler (``kopf.adopt``), since a rendered
file has no owner uid.

What a change touches: replicas change only their Deployment; the engine config (model, engine flags, connector)
changes the ConfigMap and, through the config hash in the pod templates, rolls the pods that read it.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

from pdserve.operator import constants as c
from pdserve.operator import pods, policies, secrets
from pdserve.operator.spec import ServiceSpec

Obj = dict[str, Any]

# Every (apiVersion, kind, name suffix) the operator may create. Children that the current spec does not ask for
# (a managed Redis, a ServiceMonitor) are deleted when they exist, so turning an option off cleans up after it.
CHILD_KINDS: tuple[tuple[str, str, str], ...] = (
    ("v1", "Secret", secrets.CLUSTER_SECRET_SUFFIX),
    ("v1", "Secret", secrets.REDIS_SECRET_SUFFIX),
    ("v1", "ConfigMap", "-config"),
    ("v1", "ServiceAccount", "-router"),
    ("rbac.authorization.k8s.io/v1", "Role", "-router"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "-router"),
    ("v1", "Service", "-prefill"),
    ("v1", "Service", "-decode"),
    ("v1", "Service", "-router"),
    ("apps/v1", "Deployment", "-prefill"),
    ("apps/v1", "Deployment", "-decode"),
    ("apps/v1", "Deployment", "-router"),
    ("policy/v1", "PodDisruptionBudget", "-prefill"),
    ("policy/v1", "PodDisruptionBudget", "-decode"),
    ("policy/v1", "PodDisruptionBudget", "-router"),
    ("apps/v1", "Deployment", "-redis"),
    ("v1", "Service", "-redis"),
    ("monitoring.coreos.com/v1", "ServiceMonitor", ""),
    *(("networking.k8s.io/v1", "NetworkPolicy", f"-{role}") for role in policies.POLICY_ROLES),
)


def child_keys(name: str) -> list[tuple[str, str, str]]:
    """``(apiVersion, kind, name)`` of every child an InferenceService called ``name`` may have."""
    return [(api, kind, name + suffix) for api, kind, suffix in CHILD_KINDS]


def canonical_json(obj: Any) -> str:
    """Stable JSON (sorted keys, no spaces): the form that is hashed and stored as last-applied."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def engine_config(s: ServiceSpec) -> Obj:
    """The engine configuration, as the ConfigMap shows it: shared settings plus each role's command line."""
    e, src = s.engine, s.model.source
    model: Obj = {"source": src.kind, "name": src.name, "model": pods.model_arg(s),
                  "servedModelName": s.model.served_name, "dtype": s.model.dtype}
    if src.path:
        model["path"] = src.path
    if src.revision:
        model["revision"] = src.revision
    if s.model.max_model_len:
        model["maxModelLen"] = s.model.max_model_len
    kv: Obj = {"connector": s.kv.type}
    if s.kv.type == "shared-fs":
        kv.update(kvPath=c.KV_DIR, claimName=s.kv.shared_fs_claim)
    if s.kv.type == "redis":
        kv.update(redisUrl=pods.redis_url(s), managed=s.kv.redis_deploy)
    roles = {role: {"tensorParallelSize": s.role(role).tensor_parallel,
                    "pipelineParallelSize": s.role(role).pipeline_parallel,
                    "command": shlex.join(["pdserve", *pods.engine_args(s, role)])} for role in c.ENGINE_ROLES}
    return {"model": model, "cache": {"blockSize": e.block_size, "kvCacheDtype": e.kv_cache_dtype,
                                      "gpuMemoryUtilization": e.gpu_memory_utilization,
                                      "enablePrefixCaching": e.enable_prefix_caching},
            "scheduler": {"maxNumSeqs": e.max_num_seqs, "maxNumBatchedTokens": e.max_num_batched_tokens},
            "kvTransfer": kv, "roles": roles}


def routing_config(s: ServiceSpec) -> Obj:
    """The router's ``--routing-config`` file (the format of services/router/routing_config.py).

    The spec's plugins are the decode profile's scorers; prefill picks by the same scorers except session
    affinity (a session sticks to its decode pod, where its KV cache lives). ``pdThreshold`` is the P/D decider's
    minimum prompt length for a remote prefill.
    """
    scorers = [{"type": n, "weight": w} for n, w in s.router.plugins]
    picker = {"type": "max-score"}
    return {"decode": {"filters": [{"type": "queue-threshold", "max_waiting": s.router.max_waiting}],
                       "scorers": scorers, "picker": picker},
            "prefill": {"scorers": [p for p in scorers if p["type"] != "session-affinity"], "picker": picker},
            "pd_decider": {"type": "prefix-aware", "min_prompt_tokens": s.router.pd_threshold}}


def role_config_hash(s: ServiceSpec, role: str) -> str:
    """The hash a role's pod template carries: it changes exactly when a file that role reads changes."""
    if role == "router":
        return config_hash(routing_config(s))
    cfg = engine_config(s)
    cfg["roles"] = {role: cfg["roles"][role]}
    return config_hash(cfg)


def _meta(s: ServiceSpec, name: str, role: str, extra_labels: dict[str, str] | None = None) -> Obj:
    return {"name": name, "namespace": s.namespace, "labels": {**pods.labels(s.name, role), **(extra_labels or {})}}


def config_map(s: ServiceSpec) -> Obj:
    data = {"engine.json": json.dumps(engine_config(s), indent=2, sort_keys=True) + "\n",
            "routing.json": json.dumps(routing_config(s), indent=2, sort_keys=True) + "\n"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(s, f"{s.name}-config", "config"),
            "data": data}


def deployment(s: ServiceSpec, role: str, replicas: int, template: Obj, surge: bool) -> Obj:
    # A surge pod would need GPUs that a full cluster does not have: engines roll by replacing one pod at a time.
    rolling = {"maxSurge": "25%", "maxUnavailable": 0} if surge else {"maxSurge": 0, "maxUnavailable": 1}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(s, f"{s.name}-{role}", role),
            "spec": {"replicas": replicas, "revisionHistoryLimit": 3,
                     "selector": {"matchLabels": pods.selector_labels(s.name, role)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling}, "template": template}}


def service(s: ServiceSpec, role: str, ports: list[Obj], headless: bool) -> Obj:
    spec: Obj = {"selector": pods.selector_labels(s.name, role), "ports": ports}
    if headless:
        # Engines are reached pod by pod (the router picks one); DNS lists every pod instead of one virtual IP.
        spec.update(clusterIP="None", type="ClusterIP")
    else:
        spec["type"] = "ClusterIP"
    metrics = {c.LABEL_METRICS: "true"} if role != "redis" else {}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(s, f"{s.name}-{role}", role, metrics),
            "spec": spec}


def pod_disruption_budget(s: ServiceSpec, role: str) -> Obj:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(s, f"{s.name}-{role}", role),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pods.selector_labels(s.name, role)}}}


def router_rbac(s: ServiceSpec) -> list[Obj]:
    """The router discovers engine pods through the API (a list + watch of pods): it may read pods, nothing else."""
    name = f"{s.name}-router"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(s, name, "router")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(s, name, "router"),
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(s, name, "router"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": s.namespace}]},
    ]


def service_monitor(s: ServiceSpec) -> Obj:
    # Prometheus relabels each target with the pod's role so dashboards can count prefill vs decode pods.
    relabel = [{"sourceLabels": [f"__meta_kubernetes_pod_label_{c.LABEL_ROLE.replace('.', '_').replace('/', '_')}"],
                "targetLabel": "role"}]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": _meta(s, s.name, "monitoring"),
            "spec": {"selector": {"matchLabels": {c.LABEL_SERVICE: s.name, c.LABEL_METRICS: "true"}},
                     "namespaceSelector": {"matchNames": [s.namespace]},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": s.scrape_interval,
                                    "relabelings": relabel}]}}


def render(s: ServiceSpec) -> list[Obj]:
    """Every child object of ``s``, in the order they are applied (configuration first, workloads last)."""
    metrics_port = {"name": "metrics", "port": c.METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    engine_ports = [{"name": "http", "port": c.HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                    {"name": "grpc", "port": c.GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}, metrics_port]
    router_ports = [{"name": "http", "port": c.HTTP_PORT, "targetPort": "http", "protocol": "TCP"}, metrics_port]
    objs: list[Obj] = [generated_secret(s, secrets.cluster_secret_name(s.name))]
    if s.kv.type == "redis" and s.kv.redis_deploy:
        objs.append(generated_secret(s, secrets.redis_secret_name(s.name)))
    objs += [config_map(s), *router_rbac(s), *policies.network_policies(s)]
    if s.kv.type == "redis" and s.kv.redis_deploy:
        redis_port = [{"name": "redis", "port": c.REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]
        objs += [service(s, "redis", redis_port, headless=False),
                 deployment(s, "redis", 1, pods.redis_pod(s), surge=False)]
    objs += [service(s, "prefill", engine_ports, headless=True), service(s, "decode", engine_ports, headless=True),
             service(s, "router", router_ports, headless=False)]
    for role in c.ENGINE_ROLES:
        template = pods.engine_pod(s, role, role_config_hash(s, role))
        objs.append(deployment(s, role, s.role(role).replicas, template, surge=False))
    objs.append(deployment(s, "router", s.router.replicas, pods.router_pod(s, role_config_hash(s, "router")),
                           surge=True))
    objs += [pod_disruption_budget(s, role) for role in c.ROLES]
    if s.service_monitor:
        objs.append(service_monitor(s))
    return objs


def generated_secret(s: ServiceSpec, name: str) -> Obj:
    """A Secret whose values the operator generates when it creates it (see :mod:`pdserve.operator.secrets`)."""
    return secrets.secret_object(name, s.namespace, pods.labels(s.name, "secrets"), s.rotation)


def router_url(s: ServiceSpec) -> str:
    """The router's in-cluster URL, as ``status.url`` reports it."""
    return f"http://{s.name}-router.{s.namespace}.svc:{c.HTTP_PORT}"
