"""Parse and validate an InferenceService ``spec`` into frozen dataclasses.

The CRD's OpenAPI schema and CEL rules reject most bad specs at admission, but the operator checks again here:
``pdserve operator render`` runs without an API server, old clusters may not enforce CEL, and a spec that slips
through must end as a ``Degraded`` condition with a reason, not as a crash loop. The defaults below equal the CRD's
(``tests/operator/test_crd.py`` checks that), so a spec means the same thing with or without the API server's
defaulting.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from pdserve.operator import constants as c
from pdserve.operator.autoscaling import AUTOSCALING_FIELDS, parse_autoscaling
from pdserve.operator.fields import Fields as _Fields
from pdserve.operator.fields import SpecError as SpecError  # re-exported: callers catch spec.SpecError

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A Kubernetes resource quantity (1, 500m, 8Gi, 1e3), as the API server's own pattern has it.
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                      r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
CONNECTORS = ("shared-fs", "grpc", "redis")
MODEL_SOURCES = ("bundled", "huggingFace", "pvc", "hostPath")
DEFAULT_BUNDLED_MODEL = "smollm2-135m-instruct"
# The router's scorers (services/router/plugins/scorers.py) and the weights of its "prefix-load" preset.
ROUTER_SCORERS = ("prefix-cache", "load", "queue", "kv-usage", "session-affinity")
DEFAULT_PLUGINS = (("prefix-cache", 3.0), ("load", 1.0), ("session-affinity", 1.0))
# Every prefill and decode pod runs a KV connector; connectors run with tensor parallelism (each rank moves its
# own KV heads, and prefill and decode pods may differ in size) but not yet with pipeline parallelism, so a pod
# asking for pipeline stages is refused at admission instead of failing to start.
MAX_PIPELINE_PARALLEL = 1
# Who may scrape the pods' metrics port when NetworkPolicies are on: pods of the namespace called "monitoring".
DEFAULT_PROMETHEUS_NAMESPACES: dict[str, Any] = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}


@dataclass(frozen=True)
class Permissions:
    """What the operator's installer allows InferenceServices to ask for (``pdserve operator run --allow-*``).

    A ``hostPath`` model source mounts a node's filesystem into the pods, and raw ``extraArgs`` reach past every
    check of the spec (they can point the engines at any file or turn any limit off): both stay off unless the
    chart enables them, and a spec that uses them anyway is refused with reason ``NotPermitted``.
    """

    host_path: bool = False
    extra_args: bool = False


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. ``kind`` is one of :data:`MODEL_SOURCES`."""

    kind: str
    name: str  # bundled name | Hugging Face id | PVC claim name | host path
    path: str = ""  # sub-path inside the PVC
    revision: str | None = None
    token_secret: SecretKeyRef | None = None


@dataclass(frozen=True)
class ModelSpec:
    source: ModelSource
    served_name: str
    dtype: str = "auto"
    max_model_len: int | None = None


@dataclass(frozen=True)
class EngineSpec:
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_waiting: int = 256  # --max-waiting: sequences queued per pod before it answers 429
    request_timeout: int = 600  # --request-timeout, seconds
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class PodSpec:
    """What every pod-running part (an engine role, the router) sets the same way (``_POD_FIELDS``: replicas,
    resources, placement, env, extra arguments). Pass-through Kubernetes fields are plain data, treated as
    read-only."""

    replicas: int = 1
    requests: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoleSpec(PodSpec):
    """One engine role (prefill or decode)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    gpus: int | None = None  # None: one GPU per model shard (tensor x pipeline)
    gpu_resource: str = "nvidia.com/gpu"

    @property
    def gpu_count(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel if self.gpus is None else self.gpus


@dataclass(frozen=True)
class RouterSpec(PodSpec):
    plugins: tuple[tuple[str, float], ...] = DEFAULT_PLUGINS
    pd_threshold: int = 256
    max_waiting: int = 64
    request_timeout: int = 600  # --request-timeout of the router, seconds
    api_key_secret: SecretKeyRef | None = None


@dataclass(frozen=True)
class KVConnectorSpec:
    type: str = "grpc"
    shared_fs_claim: str | None = None
    redis_url: str | None = None
    redis_deploy: bool = False
    redis_image: str = c.DEFAULT_REDIS_IMAGE
    redis_max_memory: str = "2gb"
    redis_password_secret: SecretKeyRef | None = None  # an external Redis's password (a managed one generates its own)


@dataclass(frozen=True)
class NetworkPolicySpec:
    """``spec.networkPolicy``: per-port ingress policies for the service's pods (on unless turned off)."""

    enabled: bool = True
    prometheus_namespaces: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_PROMETHEUS_NAMESPACES))


@dataclass(frozen=True)
class ServiceSpec:
    """A whole, valid InferenceService: the one input of the pure rendering functions."""

    name: str
    namespace: str
    model: ModelSpec
    engine: EngineSpec
    prefill: RoleSpec
    decode: RoleSpec
    router: RouterSpec
    kv: KVConnectorSpec
    image: str
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    service_account_name: str | None = None
    service_monitor: bool = False
    scrape_interval: str = "15s"
    network_policy: NetworkPolicySpec = field(default_factory=NetworkPolicySpec)
    rotation: str = ""  # the value of the secrets.pdserve.io/rotation annotation
    autoscaling: Any = None  # an operator.autoscaler.AutoscalingPolicy, or None: replicas as written

    def role(self, role: str) -> RoleSpec:
        return self.prefill if role == "prefill" else self.decode


def parse(name: str, namespace: str, spec: Mapping[str, Any] | None, *, default_image: str = c.DEFAULT_IMAGE,
          permissions: Permissions = Permissions(), annotations: Mapping[str, str] | None = None) -> ServiceSpec:
    """Validate ``spec`` of the InferenceService ``namespace/name``; raise :class:`SpecError` on the first problem.

    ``permissions`` are the operator's (what its installer allows); ``annotations`` are the object's metadata
    annotations (only :data:`~pdserve.operator.constants.ANNOTATION_ROTATE_SECRETS` is read).
    """
    if not isinstance(name, str) or not DNS_LABEL.match(name) or len(name) > c.MAX_NAME_LENGTH:
        raise SpecError("metadata.name", f"must be a DNS label (a-z, 0-9, '-', starting with a letter) of at most "
                                         f"{c.MAX_NAME_LENGTH} characters, got {name!r}")
    f = _Fields(spec, "spec", ("model", "engine", "prefill", "decode", "router", "kvConnector", "image",
                               "imagePullPolicy", "imagePullSecrets", "serviceAccountName", "monitoring",
                               "networkPolicy", "autoscaling"))
    pull_secrets = f.data("imagePullSecrets", list)
    if not all(isinstance(s, Mapping) and isinstance(s.get("name"), str) for s in pull_secrets):
        raise SpecError("spec.imagePullSecrets", "must be a list of {name: ...}")
    monitoring = f.sub("monitoring", ("serviceMonitor", "interval"))
    policy = f.sub("networkPolicy", ("enabled", "prometheusNamespaceSelector"))
    policy.sub("prometheusNamespaceSelector", ("matchLabels", "matchExpressions"))  # a label selector, nothing else
    rotation = (annotations or {}).get(c.ANNOTATION_ROTATE_SECRETS) or ""
    parsed = ServiceSpec(
        name=name, namespace=namespace, model=_model(f.sub("model", ("source", "servedName", "dtype", "maxModelLen"))),
        engine=_engine(f.sub("engine", ("blockSize", "kvCacheDtype", "gpuMemoryUtilization", "maxNumSeqs",
                                        "maxNumBatchedTokens", "enablePrefixCaching", "maxWaiting",
                                        "requestTimeoutSeconds", "extraArgs"))),
        prefill=_role(f.sub("prefill", _ROLE_FIELDS)), decode=_role(f.sub("decode", _ROLE_FIELDS)),
        router=_router(f.sub("router", _ROUTER_FIELDS)), kv=_kv(f.sub("kvConnector", ("type", "sharedFs", "redis"))),
        image=f.str("image") or default_image,
        image_pull_policy=f.str("imagePullPolicy", "IfNotPresent", ("Always", "IfNotPresent", "Never")),
        image_pull_secrets=tuple(s["name"] for s in pull_secrets),
        service_account_name=f.str("serviceAccountName"),
        service_monitor=monitoring.bool("serviceMonitor", False),
        scrape_interval=monitoring.str("interval", "15s"),
        network_policy=NetworkPolicySpec(
            enabled=policy.bool("enabled", True),
            prometheus_namespaces=(policy.data("prometheusNamespaceSelector", dict)
                                   if policy.has("prometheusNamespaceSelector")
                                   else copy.deepcopy(DEFAULT_PROMETHEUS_NAMESPACES))),
        rotation=str(rotation))
    if f.has("autoscaling"):
        parsed = dataclasses.replace(parsed, autoscaling=parse_autoscaling(f.sub("autoscaling", AUTOSCALING_FIELDS),
                                                                           parsed))
    _check_permissions(parsed, permissions)
    return parsed


def _check_permissions(s: ServiceSpec, permissions: Permissions) -> None:
    if s.model.source.kind == "hostPath" and not permissions.host_path:
        raise SpecError("spec.model.source.hostPath", "hostPath model sources are disabled in this operator (the "
                        "chart's operator.allowHostPath enables them)", reason="NotPermitted")
    if not permissions.extra_args:
        for path, args in (("spec.engine.extraArgs", s.engine.extra_args), ("spec.prefill.extraArgs",
                           s.prefill.extra_args), ("spec.decode.extraArgs", s.decode.extra_args),
                           ("spec.router.extraArgs", s.router.extra_args)):
            if args:
                raise SpecError(path, "raw extraArgs are disabled in this operator (the chart's "
                                "operator.allowExtraArgs enables them)", reason="NotPermitted")


def _model(f: _Fields) -> ModelSpec:
    src = f.sub("source", MODEL_SOURCES)
    chosen = [k for k in MODEL_SOURCES if src.has(k)] if f.has("source") else ["bundled"]
    if len(chosen) != 1:
        raise SpecError(src.path, f"set exactly one of {', '.join(MODEL_SOURCES)}")
    kind = chosen[0]
    if kind == "bundled":
        source = ModelSource("bundled", src.str("bundled", DEFAULT_BUNDLED_MODEL))
    elif kind == "huggingFace":
        hf = src.sub("huggingFace", ("id", "revision", "tokenSecretRef"))
        hf_id = hf.str("id")
        if not hf_id or not HF_ID.match(hf_id):
            raise SpecError(f"{hf.path}.id", f"must look like 'org/name', got {hf_id!r}")
        token = _secret_ref(hf.sub("tokenSecretRef", ("name", "key")), "token") if hf.has("tokenSecretRef") else None
        source = ModelSource("huggingFace", hf_id, revision=hf.str("revision"), token_secret=token)
    elif kind == "pvc":
        pvc = src.sub("pvc", ("claimName", "path"))
        source = ModelSource("pvc", _required(pvc, "claimName"), path=(pvc.str("path", "") or "").strip("/"))
    else:
        host = src.sub("hostPath", ("path",))
        path = _required(host, "path")
        if not path.startswith("/"):
            raise SpecError(f"{host.path}.path", f"must be an absolute path, got {path!r}")
        source = ModelSource("hostPath", path)
    default_served = {"bundled": source.name, "huggingFace": source.name,
                      "pvc": source.path.rsplit("/", 1)[-1] or source.name,
                      "hostPath": source.name.rstrip("/").rsplit("/", 1)[-1] or "model"}[kind]
    return ModelSpec(source=source, served_name=f.str("servedName") or default_served,
                     dtype=f.str("dtype", "auto", DTYPES), max_model_len=f.int("maxModelLen", None, minimum=1))


def _engine(f: _Fields) -> EngineSpec:
    util = f.number("gpuMemoryUtilization", EngineSpec.gpu_memory_utilization)
    if not 0.0 < util <= 1.0:
        raise SpecError(f"{f.path}.gpuMemoryUtilization", f"must be in (0, 1], got {util}")
    d = EngineSpec()
    return EngineSpec(block_size=f.int("blockSize", d.block_size, minimum=1, maximum=1024),
                      kv_cache_dtype=f.str("kvCacheDtype", d.kv_cache_dtype, KV_CACHE_DTYPES),
                      gpu_memory_utilization=util, max_num_seqs=f.int("maxNumSeqs", d.max_num_seqs, minimum=1),
                      max_num_batched_tokens=f.int("maxNumBatchedTokens", d.max_num_batched_tokens, minimum=1),
                      enable_prefix_caching=f.bool("enablePrefixCaching", d.enable_prefix_caching),
                      max_waiting=f.int("maxWaiting", d.max_waiting, minimum=1, maximum=MAX_WAITING),
                      request_timeout=f.int("requestTimeoutSeconds", d.request_timeout, minimum=1,
                                            maximum=MAX_TIMEOUT_S),
                      extra_args=f.strings("extraArgs"))


_POD_FIELDS = ("replicas", "resources", "nodeSelector", "tolerations", "affinity", "env", "extraArgs")
_ROLE_FIELDS = _POD_FIELDS + ("parallelism",)
_ROUTER_FIELDS = _POD_FIELDS + ("plugins", "pdThreshold", "maxWaiting", "requestTimeoutSeconds", "apiKeySecretRef")
# Upper ends of the bounded limits: finite, so no spec turns a limit off by asking for a huge one.
MAX_WAITING = 100_000
MAX_TIMEOUT_S = 86_400


def _pod_fields(f: _Fields, gpus: bool) -> dict[str, Any]:
    res = f.sub("resources", ("gpus", "gpuResource", "requests", "limits") if gpus else ("requests", "limits"))
    out = dict(replicas=f.int("replicas", PodSpec.replicas, minimum=0), requests=res.data("requests", dict),
               limits=res.data("limits", dict), node_selector=f.data("nodeSelector", dict),
               tolerations=f.data("tolerations", list), affinity=f.data("affinity", dict),
               env=f.data("env", list), extra_args=f.strings("extraArgs"))
    for key in ("requests", "limits"):
        for resource, amount in out[key].items():
            if isinstance(amount, bool) or not (isinstance(amount, int) or QUANTITY.match(str(amount))):
                raise SpecError(f"{res.path}.{key}.{resource}",
                                f"must be a quantity like 4, 500m or 8Gi, got {amount!r}")
    if not all(isinstance(e, Mapping) and isinstance(e.get("name"), str) for e in out["env"]):
        raise SpecError(f"{f.path}.env", "must be a list of environment variables with a name")
    if gpus:
        out.update(gpus=res.int("gpus", None, minimum=0), gpu_resource=res.str("gpuResource", RoleSpec.gpu_resource))
    return out


def _role(f: _Fields) -> RoleSpec:
    par = f.sub("parallelism", ("tensor", "pipeline"))
    size = par.int("pipeline", 1, minimum=1)
    if size > MAX_PIPELINE_PARALLEL:
        raise SpecError(f"{par.path}.pipeline", f"must be 1: pipeline parallelism does not run with a KV connector "
                                                f"yet, and every prefill and decode pod uses one (tensor "
                                                f"parallelism does), got {size}")
    role = RoleSpec(tensor_parallel=par.int("tensor", RoleSpec.tensor_parallel, minimum=1),
                    pipeline_parallel=par.int("pipeline", RoleSpec.pipeline_parallel, minimum=1),
                    **_pod_fields(f, gpus=True))
    if role.gpus is not None and 0 < role.gpus < role.tensor_parallel * role.pipeline_parallel:
        raise SpecError(f"{f.path}.resources.gpus", f"{role.gpus} GPU(s) cannot hold tensor x pipeline = "
                                                    f"{role.tensor_parallel * role.pipeline_parallel} model shards")
    return role


def _router(f: _Fields) -> RouterSpec:
    plugins = f.data("plugins", list) if f.has("plugins") else [{"name": n, "weight": w} for n, w in DEFAULT_PLUGINS]
    parsed: list[tuple[str, float]] = []
    for i, item in enumerate(plugins):
        p = _Fields(item, f"{f.path}.plugins[{i}]", ("name", "weight"))
        name = p.str("name", None, ROUTER_SCORERS)
        if not name:
            raise SpecError(f"{p.path}.name", "is required")
        weight = p.number("weight", 1.0)  # the CRD's default too
        if weight < 0:
            raise SpecError(f"{p.path}.weight", f"must be >= 0, got {weight}")
        if name in {n for n, _ in parsed}:
            raise SpecError(f"{p.path}.name", f"plugin {name!r} is listed twice")
        parsed.append((name, weight))
    api_key = _secret_ref(f.sub("apiKeySecretRef", ("name", "key")), "api-key") if f.has("apiKeySecretRef") else None
    return RouterSpec(plugins=tuple(parsed), pd_threshold=f.int("pdThreshold", RouterSpec.pd_threshold, minimum=0),
                      max_waiting=f.int("maxWaiting", RouterSpec.max_waiting, minimum=1, maximum=MAX_WAITING),
                      request_timeout=f.int("requestTimeoutSeconds", RouterSpec.request_timeout, minimum=1,
                                            maximum=MAX_TIMEOUT_S),
                      api_key_secret=api_key,
                      **_pod_fields(f, gpus=False))


def _kv(f: _Fields) -> KVConnectorSpec:
    d = KVConnectorSpec()
    kind = f.str("type", d.type, CONNECTORS)
    shared = f.sub("sharedFs", ("claimName",))
    redis = f.sub("redis", ("url", "deploy", "image", "maxMemory", "passwordSecretRef"))
    password = (_secret_ref(redis.sub("passwordSecretRef", ("name", "key")), "password")
                if redis.has("passwordSecretRef") else None)
    spec = KVConnectorSpec(type=kind, shared_fs_claim=shared.str("claimName"), redis_url=redis.str("url"),
                           redis_deploy=redis.bool("deploy", d.redis_deploy),
                           redis_image=redis.str("image", d.redis_image),
                           redis_max_memory=redis.str("maxMemory", d.redis_max_memory),
                           redis_password_secret=password)
    if kind == "shared-fs" and not spec.shared_fs_claim:
        raise SpecError(f"{f.path}.sharedFs.claimName", "the shared-fs connector needs a ReadWriteMany PVC")
    if kind == "redis" and not (spec.redis_url or spec.redis_deploy):
        raise SpecError(f"{f.path}.redis", "the redis connector needs redis.url or redis.deploy: true")
    if spec.redis_url and spec.redis_deploy:
        raise SpecError(f"{f.path}.redis", "set redis.url or redis.deploy: true, not both")
    if spec.redis_url and not spec.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise SpecError(f"{f.path}.redis.url",
                        f"must start with redis://, rediss:// or unix://, got {spec.redis_url!r}")
    if spec.redis_url and _URL_USERINFO.match(spec.redis_url):
        # A password in the URL would land in the ConfigMap, the pods' arguments and error messages.
        raise SpecError(f"{f.path}.redis.url", "must not carry a user or password; put the password in a Secret "
                                               "and name it in redis.passwordSecretRef")
    if spec.redis_deploy and spec.redis_password_secret:
        raise SpecError(f"{f.path}.redis.passwordSecretRef", "a managed Redis (deploy: true) gets a generated "
                                                             "password; passwordSecretRef is for redis.url")
    return spec


_URL_USERINFO = re.compile(r"^[a-z]+://[^/@]*@")


def _required(f: _Fields, key: str) -> str:
    value = f.str(key)
    if not value:
        raise SpecError(f"{f.path}.{key}", "is required")
    return value


def _secret_ref(f: _Fields, default_key: str) -> SecretKeyRef:
    return SecretKeyRef(name=_required(f, "name"), key=f.str("key", default_key))
