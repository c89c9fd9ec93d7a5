"""The InferenceService CustomResourceDefinition, built from the spec dataclasses' defaults.

The chart ships the result as ``charts/pdserve/crds/inferenceservices.pdserve.io.yaml``; a test fails when the
file is stale. Regenerate it with::

    python -m pdserve.operator.crd > charts/pdserve/crds/inferenceservices.pdserve.io.yaml

Taking every default from :mod:`pdserve.operator.spec` keeps the API server's defaulting and the operator's own
parsing equal by construction. Parents of defaulted fields default to ``{}`` so that the nested defaults apply
even when a user leaves the whole section out.
"""

from __future__ import annotations

import sys
from typing import Any

from pdserve.operator import constants as c
from pdserve.operator import autoscaler
from pdserve.operator import spec as s

Schema = dict[str, Any]


def _with(schema: Schema, description: str | None, default: Any = None, rules: list[Schema] | None = None) -> Schema:
    if description:
        schema["description"] = description
    if default is not None:
        schema["default"] = default
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def rule(expression: str, message: str) -> Schema:
    return {"rule": expression, "message": message}


def obj(props: dict[str, Schema], description: str | None = None, required: tuple[str, ...] = (),
        default: Any = None, rules: list[Schema] | None = None) -> Schema:
    schema: Schema = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return _with(schema, description, default, rules)


def string(description: str, default: str | None = None, enum: tuple[str, ...] = (), pattern: str | None = None,
           max_length: int | None = None) -> Schema:
    schema: Schema = {"type": "string"}
    if enum:
        schema["enum"] = list(enum)
    if pattern:
        schema["pattern"] = pattern
    if max_length:
        schema["maxLength"] = max_length
    return _with(schema, description, default)


def integer(description: str, default: int | None = None, minimum: int | None = None,
            maximum: int | None = None) -> Schema:
    schema: Schema = {"type": "integer", "format": "int32"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return _with(schema, description, default)


def number(description: str, default: float | None = None) -> Schema:
    return _with({"type": "number"}, description, default)


def boolean(description: str, default: bool | None = None) -> Schema:
    return _with({"type": "boolean"}, description, default)


def strings(description: str, max_items: int = 64) -> Schema:
    return {"type": "array", "description": description, "maxItems": max_items, "items": {"type": "string"}}


def string_map(description: str) -> Schema:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string"}}


def quantity_map(description: str) -> Schema:
    quantity = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
                "pattern": s.QUANTITY.pattern}
    return {"type": "object", "description": description, "additionalProperties": quantity}


def passthrough(description: str, array: bool = False) -> Schema:
    """A Kubernetes structure (tolerations, affinity, env) passed to the pods as written."""
    item = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if array:
        return {"type": "array", "description": description, "maxItems": 64, "items": item}
    return {**item, "description": description}


def secret_ref(description: str, default_key: str) -> Schema:
    return obj({"name": string("Secret name.", max_length=253), "key": string("Key in the Secret.", default_key)},
               description, required=("name",))


def _pod_props(gpus: bool) -> dict[str, Schema]:
    role = s.RoleSpec()
    res: dict[str, Schema] = {"requests": quantity_map("Resource requests, e.g. cpu: 4, memory: 32Gi."),
                              "limits": quantity_map("Resource limits.")}
    if gpus:
        res = {"gpus": integer("GPUs per pod. Default: one per model shard (tensor x pipeline); 0 runs on CPU.",
                               minimum=0, maximum=64),
               "gpuResource": string("Extended resource that counts GPUs.", role.gpu_resource), **res}
    return {
        "replicas": integer("Number of pods.", role.replicas, minimum=0, maximum=1024),
        "resources": obj(res, "Compute resources of each pod.", default={}),
        "nodeSelector": string_map("Node labels the pods must run on."),
        "tolerations": passthrough("Pod tolerations (core/v1 Toleration).", array=True),
        "affinity": passthrough("Pod affinity (core/v1 Affinity)."),
        "env": {**passthrough("Extra environment variables (core/v1 EnvVar).", array=True),
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "required": ["name"],
                          "properties": {"name": {"type": "string"}}}},
        "extraArgs": strings("Extra command-line flags appended to this role's command (only where the operator "
                             "allows extraArgs)."),
    }


def engine_role(description: str) -> Schema:
    props = _pod_props(gpus=True)
    # Pipeline: maximum 1 until pipeline stages run with a KV connector (every prefill and decode pod has one):
    # the API server refuses larger sizes at admission. Prefill and decode may differ in tensor size.
    props["parallelism"] = obj({"tensor": integer("Tensor-parallel size (GPUs per model replica); prefill and "
                                                  "decode pods may differ.", 1, minimum=1),
                                "pipeline": integer("Pipeline-parallel size; only 1 until pipeline stages run "
                                                    "with a KV connector.", 1, minimum=1,
                                                    maximum=s.MAX_PIPELINE_PARALLEL)},
                               "How one model replica is split over GPUs.", default={})
    shards = "self.parallelism.tensor * self.parallelism.pipeline"
    return obj(props, description, default={}, rules=[rule(
        f"!has(self.resources.gpus) || self.resources.gpus == 0 || self.resources.gpus >= {shards}",
        "resources.gpus must be 0 (CPU) or at least tensor x pipeline")])


def spec_schema() -> Schema:
    eng, router, kv = s.EngineSpec(), s.RouterSpec(), s.KVConnectorSpec()
    one_source = "[has(self.bundled), has(self.huggingFace), has(self.pvc), has(self.hostPath)]" \
                 ".filter(x, x).size() == 1"
    source = obj({
        "bundled": string("A model that ships inside the image.", pattern="^[a-z0-9][a-z0-9._-]*$"),
        "huggingFace": obj({"id": string("Hugging Face model id, org/name.", pattern=s.HF_ID.pattern),
                            "revision": string("Branch, tag or commit."),
                            "tokenSecretRef": secret_ref("Secret with a Hugging Face token.", "token")},
                           "Download from the Hugging Face Hub when a pod starts.", required=("id",)),
        "pvc": obj({"claimName": string("PersistentVolumeClaim holding the weights.", max_length=253),
                    "path": string("Model directory inside the volume.")}, "Weights on a PVC.",
                   required=("claimName",)),
        "hostPath": obj({"path": string("Model directory on every node.", pattern="^/")},
                        "Weights on the nodes' filesystem (only where the operator allows hostPath).",
                        required=("path",)),
    }, "Where the weights come from: set exactly one.", default={"bundled": s.DEFAULT_BUNDLED_MODEL},
        rules=[rule(one_source, "set exactly one of bundled, huggingFace, pvc, hostPath")])
    model = obj({"source": source, "servedName": string("Model name clients use (default: from the source)."),
                 "dtype": string("Weights and activations dtype.", "auto", s.DTYPES),
                 "maxModelLen": integer("Context length (default: the model's).", minimum=1)},
                "The model to serve.", default={})
    engine = obj({
        "blockSize": integer("Tokens per KV cache block.", eng.block_size, minimum=1, maximum=1024),
        "kvCacheDtype": string("KV cache dtype.", eng.kv_cache_dtype, s.KV_CACHE_DTYPES),
        "gpuMemoryUtilization": {**number("Fraction of GPU memory the engine may use.", eng.gpu_memory_utilization),
                                 "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
        "maxNumSeqs": integer("Most sequences in one batch.", eng.max_num_seqs, minimum=1),
        "maxNumBatchedTokens": integer("Token budget of one scheduler step.", eng.max_num_batched_tokens, minimum=1),
        "enablePrefixCaching": boolean("Reuse KV blocks of shared prompt prefixes.", eng.enable_prefix_caching),
        "maxWaiting": integer("Sequences waiting in one pod before it refuses more (--max-waiting; 429).",
                              eng.max_waiting, minimum=1, maximum=s.MAX_WAITING),
        "requestTimeoutSeconds": integer("Pods abort requests running longer than this (--request-timeout).",
                                         eng.request_timeout, minimum=1, maximum=s.MAX_TIMEOUT_S),
        "extraArgs": strings("Extra engine flags for both prefill and decode (only where the operator allows "
                             "extraArgs)."),
    }, "Engine settings shared by prefill and decode.", default={})
    router_props = _pod_props(gpus=False)
    router_props.update({
        "plugins": {"type": "array", "description": "Scorers that rank pods, with their weights.", "maxItems": 32,
                    "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "default": [{"name": n, "weight": w} for n, w in router.plugins],
                    "items": obj({"name": string("A scorer of the router.", enum=s.ROUTER_SCORERS),
                                  "weight": {**number("Weight of the plugin's score.", 1.0), "minimum": 0}},
                                 required=("name",))},
        "pdThreshold": integer("Prompts shorter than this many tokens skip remote prefill (decode computes them).",
                               router.pd_threshold, minimum=0),
        "maxWaiting": integer("Decode pods with more waiting requests than this are skipped while others have room.",
                              router.max_waiting, minimum=1, maximum=s.MAX_WAITING),
        "requestTimeoutSeconds": integer("The router aborts requests running longer than this (--request-timeout).",
                                         router.request_timeout, minimum=1, maximum=s.MAX_TIMEOUT_S),
        "apiKeySecretRef": secret_ref("Secret with the API key clients must send.", "api-key"),
    })
    kv_schema = obj({
        "type": string("How KV blocks move from prefill to decode.", kv.type, s.CONNECTORS),
        "sharedFs": obj({"claimName": string("ReadWriteMany PVC shared by prefill and decode pods.",
                                             max_length=253)}, "Options of the shared-fs connector."),
        "redis": obj({"url": string("URL of an existing Redis.", pattern="^(redis|rediss|unix)://"),
                      "deploy": boolean("Let the operator run a cache-only Redis.", kv.redis_deploy),
                      "image": string("Image of the managed Redis.", kv.redis_image),
                      "maxMemory": string("Memory budget of the managed Redis (LRU beyond it).",
                                          kv.redis_max_memory),
                      "passwordSecretRef": secret_ref("Secret with the password of redis.url (a managed Redis "
                                                      "gets a generated one).", "password")},
                     "Options of the redis connector.",
                     rules=[rule("!(has(self.url) && self.deploy)", "set redis.url or redis.deploy: true, not both"),
                            rule("!has(self.url) || !self.url.matches('^[a-z]+://[^/@]*@')",
                                 "redis.url must not carry a password: use redis.passwordSecretRef"),
                            rule("!(has(self.passwordSecretRef) && self.deploy)",
                                 "a managed Redis gets a generated password; passwordSecretRef is for redis.url")]),
    }, "KV cache transfer between prefill and decode.", default={}, rules=[
        rule("self.type != 'redis' || (has(self.redis) && (has(self.redis.url) || self.redis.deploy))",
             "the redis connector needs redis.url or redis.deploy: true"),
        rule("self.type != 'shared-fs' || (has(self.sharedFs) && has(self.sharedFs.claimName))",
             "the shared-fs connector needs sharedFs.claimName")])
    return obj({
        "model": model, "engine": engine,
        "prefill": engine_role("Prefill pods: compute prompts and hand their KV cache over."),
        "decode": engine_role("Decode pods: load the KV cache and generate tokens."),
        "router": obj(router_props, "The router in front of prefill and decode.", default={}),
        "kvConnector": kv_schema,
        "image": string("pdserve image (default: the operator's --default-image)."),
        "imagePullPolicy": string("Image pull policy.", "IfNotPresent", ("Always", "IfNotPresent", "Never")),
        "imagePullSecrets": {"type": "array", "maxItems": 16, "description": "Secrets for pulling the image.",
                             "items": obj({"name": string("Secret name.")}, required=("name",))},
        "serviceAccountName": string("ServiceAccount of the engine pods."),
        "monitoring": obj({"serviceMonitor": boolean("Create a Prometheus-operator ServiceMonitor.", False),
                           "interval": string("Scrape interval.", "15s", pattern="^[0-9]+(ms|s|m|h)$")},
                          "Metrics scraping.", default={}),
        "networkPolicy": obj({
            "enabled": boolean("Render NetworkPolicies: engine API ports only from this service's router, KV "
                               "ports only from its decode pods, Redis only from its engines, metrics only from "
                               "the Prometheus namespaces.", True),
            "prometheusNamespaceSelector": obj(
                {"matchLabels": string_map("Labels the namespaces must have."),
                 "matchExpressions": passthrough("Label selector requirements (meta/v1).", array=True)},
                "Namespaces (a label selector) whose pods may scrape the metrics port; {} allows every namespace.",
                default=s.DEFAULT_PROMETHEUS_NAMESPACES)},
            "Ingress policies of the service's pods.", default={}),
        "autoscaling": autoscaling_schema(),
    }, "What to serve and how.", default={})


def autoscaling_schema() -> Schema:
    """``spec.autoscaling`` (docs/autoscaling.md). Absent: the roles' replicas are fixed as written."""
    d = autoscaler.AutoscalingPolicy
    return obj({
        "ttftTargetSeconds": number("Time-to-first-token objective at the percentile (seconds)."),
        "itlTargetSeconds": number("Inter-token latency objective at the percentile (seconds)."),
        "percentile": number("Percentile the targets apply to, in [0.5, 1).", d.percentile),
        "minPrefill": integer("Fewest prefill pods.", d.min_prefill, minimum=0),
        "maxPrefill": integer("Most prefill pods.", d.max_prefill, minimum=0),
        "minDecode": integer("Fewest decode pods.", d.min_decode, minimum=1),
        "maxDecode": integer("Most decode pods.", d.max_decode, minimum=1),
        "gpuBudget": integer("Most GPUs of both roles together (default: only the maxima bound).", minimum=1),
        "intervalSeconds": number("Seconds between two decisions.", d.interval_s),
        "scaleUpIntervalSeconds": number("Seconds between two scale-up checks between decisions (only up; "
                                         "default: no checks)."),
        "scaleDownWindowSeconds": number("A count goes down only to the highest one wanted within this window.",
                                         d.scale_down_window_s),
        "tolerance": number("Relative changes smaller than this are ignored, in [0, 1).", d.tolerance),
        "dryRun": boolean("Decide and report (status, Events) without changing replicas.", False),
    }, "SLO-driven scaling of the prefill and decode Deployments; the roles' replicas are the starting counts.",
        required=("ttftTargetSeconds", "itlTargetSeconds"))


def status_schema() -> Schema:
    counts = obj({"replicas": integer("Desired pods."), "readyReplicas": integer("Ready pods."),
                  "updatedReplicas": integer("Pods with the latest template."),
                  "ready": string("ready/desired, for kubectl get.")})
    cond = obj({"type": string("Condition type."), "status": string("True, False or Unknown.",
                                                                     enum=("True", "False", "Unknown")),
                "reason": string("CamelCase reason."), "message": string("Human-readable details."),
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer", "format": "int64"}},
               required=("type", "status"))
    return obj({
        "phase": string("Pending, Progressing, Ready or Degraded.",
                        enum=("Pending", "Progressing", "Ready", "Degraded")),
        "observedGeneration": {"type": "integer", "format": "int64"},
        "url": string("The router's in-cluster URL."), "servedModel": string("Model name clients use."),
        "prefill": counts, "decode": counts, "router": counts,
        "autoscaling": obj({
            "prefillReplicas": integer("Prefill pods decided."), "decodeReplicas": integer("Decode pods decided."),
            "wantedPrefill": integer("Prefill pods the load asks for (before hysteresis and budget)."),
            "wantedDecode": integer("Decode pods the load asks for (before hysteresis and budget)."),
            "budgetLimited": boolean("The GPU budget cut the counts."),
            "colocateRecommended": boolean("Short prompts at low load: colocated serving (prefill 0) would do "
                                           "better; reported only."),
            "dryRun": boolean("Decisions are reported, not applied."),
            "lastDecisionTime": {"type": "string", "format": "date-time"},
            "reason": string("The estimates behind the last decision.")}, "The autoscaler's last decision."),
        "conditions": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                       "items": cond},
    }, "Observed state, written by the operator.")


def crd() -> Schema:
    """The whole CustomResourceDefinition object."""
    name_rules = [rule(f"self.metadata.name.size() <= {c.MAX_NAME_LENGTH}",
                       f"the name must be at most {c.MAX_NAME_LENGTH} characters (children append suffixes)"),
                  rule("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                       "the name must be a DNS label starting with a letter (it names Services)")]
    root = obj({"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                "spec": spec_schema(), "status": status_schema()},
               "A model served with prefill/decode disaggregation: prefill, decode and router pods.",
               rules=name_rules)
    column = [("Model", ".status.servedModel", 0), ("Prefill", ".status.prefill.ready", 0),
              ("Decode", ".status.decode.ready", 0), ("Router", ".status.router.ready", 0),
              ("Phase", ".status.phase", 0), ("URL", ".status.url", 1)]
    printer = [{"name": n, "type": "string", "jsonPath": p, **({"priority": pr} if pr else {})} for n, p, pr in column]
    printer.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{c.PLURAL}.{c.GROUP}", "labels": {c.LABEL_NAME: "pdserve"}},
        "spec": {"group": c.GROUP, "scope": "Namespaced",
                 "names": {"kind": c.KIND, "listKind": f"{c.KIND}List", "plural": c.PLURAL,
                           "singular": c.KIND.lower(), "shortNames": [c.SHORT_NAME], "categories": ["pdserve"]},
                 "versions": [{"name": c.VERSION, "served": True, "storage": True,
                               "subresources": {"status": {}}, "additionalPrinterColumns": printer,
                               "schema": {"openAPIV3Schema": root}}]},
    }


def main() -> int:
    from pdserve.operator.cli import dump_yaml

    sys.stdout.write("# Generated by `python -m pdserve.operator.crd`; do not edit by hand.\n")
    sys.stdout.write(dump_yaml([crd()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
