"""Pure builders of the pod templates: engine (prefill/decode), router and the managed Redis.

Every pod runs as a non-root user with a read-only root filesystem; what must be writable (``/tmp`` for caches,
``/dev/shm`` for tensor-parallel NCCL, a downloaded model) is an ``emptyDir``.
"""

from __future__ import annotations

import copy
from typing import Any

from pdserve.operator import constants as c
from pdserve.operator import secrets
from pdserve.operator.spec import PodSpec, ServiceSpec

Obj = dict[str, Any]

# The image carries huggingface_hub (a transformers dependency); its Python API is stabler than its CLI's name.
HF_DOWNLOAD = ("import sys\nfrom huggingface_hub import snapshot_download\n"
               "patterns = sys.argv[4].split(',') if len(sys.argv) > 4 else None\n"
               "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2] or None, local_dir=sys.argv[3], "
               "allow_patterns=patterns)\n")
# What the router needs of a model: its tokenizer and config, not its weights.
TOKENIZER_FILES = "*.json,*.txt,*.model,*.tiktoken"


def selector_labels(name: str, role: str) -> dict[str, str]:
    """The labels that select one role's pods; immutable for the life of a Deployment."""
    return {c.LABEL_SERVICE: name, c.LABEL_ROLE: role}


def selector_string(name: str, role: str) -> str:
    """The same labels as a label-selector string, as the router's ``--prefill-selector`` takes them."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name, role).items())


def labels(name: str, role: str) -> dict[str, str]:
    """All labels of a child object or pod of ``role``."""
    return {**selector_labels(name, role), c.LABEL_NAME: "pdserve", c.LABEL_INSTANCE: name,
            c.LABEL_COMPONENT: role, c.LABEL_MANAGED_BY: c.MANAGED_BY}


def model_arg(s: ServiceSpec) -> str:
    """What the engines get as ``--model``: a bundled name or a directory inside the pod."""
    src = s.model.source
    if src.kind == "bundled":
        return src.name
    if src.kind == "huggingFace":
        return f"{c.MODEL_DIR}/{src.name}"
    if src.kind == "pvc" and src.path:
        return f"{c.MODEL_DIR}/{src.path}"
    return c.MODEL_DIR


def redis_url(s: ServiceSpec) -> str | None:
    """The Redis URL the engines get: never with a password (that comes from a Secret as an env variable)."""
    if s.kv.type != "redis":
        return None
    return s.kv.redis_url or f"redis://{s.name}-redis.{s.namespace}.svc:{c.REDIS_PORT}/0"


def kv_ports(s: ServiceSpec) -> list[int]:
    """The prefill pods' KV server ports (grpc connector): rank ``r`` of a tensor-parallel engine listens on
    ``KV_PORT + r``."""
    return [c.KV_PORT + rank for rank in range(s.role("prefill").tensor_parallel)]


def engine_args(s: ServiceSpec, role: str) -> list[str]:
    """The ``pdserve prefill|decode`` command line of one engine role."""
    r, e = s.role(role), s.engine
    args = [role, "--host", "0.0.0.0", "--port", str(c.HTTP_PORT), "--grpc-port", str(c.GRPC_PORT),
            "--metrics-port", str(c.METRICS_PORT), "--max-waiting", str(e.max_waiting),
            "--request-timeout", str(e.request_timeout), "--model", model_arg(s),
            "--served-model-name", s.model.served_name, "--kv-connector", s.kv.type]
    if s.kv.type == "grpc" and role == "prefill":
        # Only producers run a KV server. Decode pods pull from this address; $(POD_IP) is expanded by the kubelet
        # from the env below.
        args += ["--kv-port", str(c.KV_PORT), "--kv-advertise-host", "$(POD_IP)"]
    if s.kv.type == "shared-fs":
        args += ["--kv-path", c.KV_DIR]
    url = redis_url(s)
    if url:
        args += ["--redis-url", url]
    args += ["--dtype", s.model.dtype]
    if s.model.max_model_len:
        args += ["--max-model-len", str(s.model.max_model_len)]
    args += ["--block-size", str(e.block_size), "--kv-cache-dtype", e.kv_cache_dtype,
             "--gpu-memory-utilization", f"{e.gpu_memory_utilization:g}", "--max-num-seqs", str(e.max_num_seqs),
             "--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    if not e.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    args += ["--tensor-parallel-size", str(r.tensor_parallel), "--pipeline-parallel-size", str(r.pipeline_parallel)]
    if r.gpu_count == 0:
        args += ["--device", "cpu"]  # resources.gpus: 0 means CPU; "auto" would pick a GPU that the pod may not use
    return args + list(e.extra_args) + list(r.extra_args)


def router_args(s: ServiceSpec) -> list[str]:
    """The ``pdserve router`` command line: model and block size must equal the engines' (prefix hashing)."""
    args = ["router", "--host", "0.0.0.0", "--port", str(c.HTTP_PORT), "--metrics-port", str(c.METRICS_PORT),
            "--request-timeout", str(s.router.request_timeout), "--model", model_arg(s),
            "--served-model-name", s.model.served_name]
    if s.model.max_model_len:
        args += ["--max-model-len", str(s.model.max_model_len)]
    args += ["--block-size", str(s.engine.block_size), "--discovery", "kubernetes", "--namespace", s.namespace,
             "--prefill-selector", selector_string(s.name, "prefill"),
             "--decode-selector", selector_string(s.name, "decode"),
             "--pod-grpc-port", str(c.GRPC_PORT), "--pod-kv-events-port", str(c.KV_EVENTS_PORT),
             "--routing-config", f"{c.CONFIG_DIR}/routing.json"]
    # The API key is no argument (``ps`` and the pod spec would show it): the router reads $PDSERVE_API_KEY.
    return args + list(s.router.extra_args)


def pod_security_context(user: int = c.RUN_AS_USER) -> Obj:
    return {"runAsNonRoot": True, "runAsUser": user, "runAsGroup": user, "fsGroup": user,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> Obj:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _resources(requests: dict[str, Any], limits: dict[str, Any], gpus: int = 0, gpu_resource: str = "") -> Obj:
    # Quantities as strings: the canonical form, and what typed clients insist on.
    limits = {k: str(v) for k, v in limits.items()}
    if gpus:
        # Extended resources are requested through limits alone; requests default to the same number.
        limits[gpu_resource] = str(gpus)
    out: Obj = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = limits
    return out


def _env(defaults: list[Obj], user: list[Obj]) -> list[Obj]:
    """Defaults first, then the user's variables; a user variable replaces a default of the same name."""
    names = {e["name"] for e in user}
    return [e for e in defaults if e["name"] not in names] + copy.deepcopy(user)


def _secret_env(name: str, secret: str, key: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def secret_env(s: ServiceSpec, role: str) -> list[Obj]:
    """The secrets a pod of ``role`` gets, each as an env variable from a Secret (never as an argument)."""
    env = [_secret_env(c.CLUSTER_SECRET_ENV, secrets.cluster_secret_name(s.name), c.CLUSTER_SECRET_KEY)]
    if role == "router" and s.router.api_key_secret:
        ref = s.router.api_key_secret
        env.append(_secret_env(c.API_KEY_ENV, ref.name, ref.key))
    if role in c.ENGINE_ROLES and s.kv.type == "redis":
        if s.kv.redis_deploy:
            env.append(_secret_env(c.REDIS_PASSWORD_ENV, secrets.redis_secret_name(s.name), c.REDIS_PASSWORD_KEY))
        elif s.kv.redis_password_secret:
            ref = s.kv.redis_password_secret
            env.append(_secret_env(c.REDIS_PASSWORD_ENV, ref.name, ref.key))
    return env


def _template_annotations(s: ServiceSpec, config_hash: str) -> dict[str, str]:
    annotations = {c.ANNOTATION_CONFIG_HASH: config_hash}
    if s.rotation:  # a rotation rolls every pod, so each reads the regenerated Secret
        annotations[c.ANNOTATION_ROTATE_SECRETS] = s.rotation
    return annotations


def _http_probe(period: int, failures: int, timeout: int = 5) -> Obj:
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures}


def _placement(spec: Obj, r: PodSpec) -> None:
    if r.node_selector:
        spec["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        spec["tolerations"] = copy.deepcopy(r.tolerations)
    if r.affinity:
        spec["affinity"] = copy.deepcopy(r.affinity)


def _image_fields(s: ServiceSpec, spec: Obj) -> None:
    if s.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]


def _model_volume(s: ServiceSpec) -> Obj | None:
    src = s.model.source
    if src.kind == "huggingFace":
        return {"name": "model", "emptyDir": {}}
    if src.kind == "pvc":
        return {"name": "model", "persistentVolumeClaim": {"claimName": src.name, "readOnly": True}}
    if src.kind == "hostPath":
        return {"name": "model", "hostPath": {"path": src.name, "type": "Directory"}}
    return None


def _hf_init_container(s: ServiceSpec, tokenizer_only: bool = False) -> Obj:
    src = s.model.source
    env: list[Obj] = [{"name": "HF_HOME", "value": f"{c.TMP_DIR}/hf"}]
    if src.token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": src.token_secret.name,
                                                                      "key": src.token_secret.key}}})
    command = ["python", "-c", HF_DOWNLOAD, src.name, src.revision or "", model_arg(s)]
    return {"name": "fetch-model", "image": s.image, "imagePullPolicy": s.image_pull_policy,
            "command": command + ([TOKENIZER_FILES] if tokenizer_only else []),
            "env": env, "securityContext": container_security_context(),
            "volumeMounts": [{"name": "model", "mountPath": c.MODEL_DIR}, {"name": "tmp", "mountPath": c.TMP_DIR}]}


def _model_mounts(s: ServiceSpec, spec: Obj, mounts: list[Obj], tokenizer_only: bool) -> None:
    """Add the model's volume (and, from the Hub, the init container that fills it) to a pod spec."""
    volume = _model_volume(s)
    if volume is None:
        return
    spec["volumes"].append(volume)
    mounts.append({"name": "model", "mountPath": c.MODEL_DIR, "readOnly": True})  # only fetch-model writes
    if s.model.source.kind == "huggingFace":
        spec["initContainers"] = [_hf_init_container(s, tokenizer_only)]


def engine_pod(s: ServiceSpec, role: str, config_hash: str) -> Obj:
    """The pod template of the prefill or decode Deployment."""
    r = s.role(role)
    mounts: list[Obj] = [{"name": "config", "mountPath": c.CONFIG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": c.TMP_DIR}, {"name": "dshm", "mountPath": "/dev/shm"}]
    spec: Obj = {"automountServiceAccountToken": False, "securityContext": pod_security_context(),
                 "terminationGracePeriodSeconds": 60,
                 "volumes": [{"name": "config", "configMap": {"name": f"{s.name}-config"}},
                             {"name": "tmp", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    _model_mounts(s, spec, mounts, tokenizer_only=False)
    if s.kv.type == "shared-fs":
        spec["volumes"].append({"name": "kv", "persistentVolumeClaim": {"claimName": s.kv.shared_fs_claim}})
        mounts.append({"name": "kv", "mountPath": c.KV_DIR})
    ports = [{"name": "http", "containerPort": c.HTTP_PORT, "protocol": "TCP"},
             {"name": "grpc", "containerPort": c.GRPC_PORT, "protocol": "TCP"},
             {"name": "kv-events", "containerPort": c.KV_EVENTS_PORT, "protocol": "TCP"}]
    if s.kv.type == "grpc" and role == "prefill":  # the KV servers, one per tensor rank; decode pods run none
        ports += [{"name": "kv" if rank == 0 else f"kv-{rank}", "containerPort": port, "protocol": "TCP"}
                  for rank, port in enumerate(kv_ports(s))]
    ports.append({"name": "metrics", "containerPort": c.METRICS_PORT, "protocol": "TCP"})
    # Caches of torch, Triton and Hugging Face land in /tmp: the root filesystem is read-only.
    env = _env([{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "HOME", "value": c.TMP_DIR}, {"name": "XDG_CACHE_HOME", "value": f"{c.TMP_DIR}/.cache"},
                {"name": "HF_HOME", "value": f"{c.TMP_DIR}/hf"}, *secret_env(s, role)], r.env)
    spec["containers"] = [{
        "name": "engine", "image": s.image, "imagePullPolicy": s.image_pull_policy,
        "command": ["pdserve"], "args": engine_args(s, role), "env": env, "ports": ports,
        # Loading and warming a large model can take many minutes; the startup probe gives it 30.
        "startupProbe": _http_probe(period=10, failures=180),
        "readinessProbe": _http_probe(period=5, failures=3),
        "livenessProbe": _http_probe(period=10, failures=6),
        "resources": _resources(r.requests, r.limits, r.gpu_count, r.gpu_resource),
        "securityContext": container_security_context(), "volumeMounts": mounts,
    }]
    if s.service_account_name:
        spec["serviceAccountName"] = s.service_account_name
    _placement(spec, r)
    _image_fields(s, spec)
    return {"metadata": {"labels": labels(s.name, role), "annotations": _template_annotations(s, config_hash)},
            "spec": spec}


def router_pod(s: ServiceSpec, config_hash: str) -> Obj:
    """The router's pod template. It watches the engine pods (its own ServiceAccount) and tokenizes prompts as
    the engines do (the model's tokenizer, mounted like the engines' weights)."""
    r = s.router
    env_defaults: list[Obj] = [{"name": "HOME", "value": c.TMP_DIR}, {"name": "HF_HOME", "value": f"{c.TMP_DIR}/hf"},
                               *secret_env(s, "router")]
    mounts: list[Obj] = [{"name": "config", "mountPath": c.CONFIG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": c.TMP_DIR}]
    spec: Obj = {"serviceAccountName": f"{s.name}-router", "securityContext": pod_security_context(),
                 "terminationGracePeriodSeconds": 30,
                 "volumes": [{"name": "config", "configMap": {"name": f"{s.name}-config"}},
                             {"name": "tmp", "emptyDir": {}}]}
    _model_mounts(s, spec, mounts, tokenizer_only=True)
    spec["containers"] = [{
        "name": "router", "image": s.image, "imagePullPolicy": s.image_pull_policy,
        "command": ["pdserve"], "args": router_args(s), "env": _env(env_defaults, r.env),
        "ports": [{"name": "http", "containerPort": c.HTTP_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": c.METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": _http_probe(period=5, failures=3),
        "livenessProbe": _http_probe(period=10, failures=6),
        "resources": _resources(r.requests, r.limits),
        "securityContext": container_security_context(), "volumeMounts": mounts,
    }]
    _placement(spec, r)
    _image_fields(s, spec)
    return {"metadata": {"labels": labels(s.name, "router"), "annotations": _template_annotations(s, config_hash)},
            "spec": spec}


def redis_pod(s: ServiceSpec) -> Obj:
    """A cache-only Redis (no persistence): losing it costs recomputed prefills, never wrong answers.

    Its password comes from the generated Secret as ``$(REDIS_PASSWORD)``: the kubelet expands it, so neither
    the pod spec nor the ConfigMap holds it (Redis rewrites its process title, so ``ps`` does not show it).
    """
    container: Obj = {
        "name": "redis", "image": s.kv.redis_image, "imagePullPolicy": "IfNotPresent",
        "args": ["--save", "", "--appendonly", "no", "--maxmemory", s.kv.redis_max_memory,
                 "--maxmemory-policy", "allkeys-lru", "--requirepass", "$(REDIS_PASSWORD)"],
        "env": [_secret_env("REDIS_PASSWORD", secrets.redis_secret_name(s.name), c.REDIS_PASSWORD_KEY)],
        "ports": [{"name": "redis", "containerPort": c.REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10},
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    annotations = {c.ANNOTATION_ROTATE_SECRETS: s.rotation} if s.rotation else {}
    return {"metadata": {"labels": labels(s.name, "redis"), **({"annotations": annotations} if annotations else {})},
            "spec": {"automountServiceAccountToken": False,
                     "securityContext": pod_security_context(c.REDIS_RUN_AS_USER),
                     "containers": [container], "volumes": [{"name": "data", "emptyDir": {}}]}}
