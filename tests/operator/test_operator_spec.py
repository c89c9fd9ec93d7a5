"""Spec parsing: defaults, derived values, and one clear error per kind of mistake."""

from __future__ import annotations

import pytest

from pdserve.operator import spec
from pdserve.operator.spec import SpecError


ALLOW_ALL = spec.Permissions(host_path=True, extra_args=True)


def parse(s: dict | None, name: str = "chat", permissions: spec.Permissions = ALLOW_ALL) -> spec.ServiceSpec:
    return spec.parse(name, "ns", s, default_image="img:1", permissions=permissions)


def test_empty_spec_means_the_bundled_model_with_defaults() -> None:
    s = parse({})
    assert s.model == spec.ModelSpec(source=spec.ModelSource("bundled", "smollm2-135m-instruct"),
                                     served_name="smollm2-135m-instruct", dtype="auto", max_model_len=None)
    assert s.engine == spec.EngineSpec()
    assert s.prefill == s.decode == spec.RoleSpec()
    assert s.prefill.gpu_count == 1
    assert s.router.plugins == (("prefix-cache", 3.0), ("load", 1.0), ("session-affinity", 1.0))
    assert s.kv == spec.KVConnectorSpec(type="grpc")
    assert (s.image, s.image_pull_secrets, s.service_monitor) == ("img:1", (), False)
    assert parse(None) == s


@pytest.mark.parametrize("source, served", [
    ({"bundled": "smollm2-135m-instruct"}, "smollm2-135m-instruct"),
    ({"huggingFace": {"id": "Qwen/Qwen3-8B"}}, "Qwen/Qwen3-8B"),
    ({"pvc": {"claimName": "weights", "path": "/meta/llama-8b/"}}, "llama-8b"),
    ({"pvc": {"claimName": "weights"}}, "weights"),
    ({"hostPath": {"path": "/models/qwen3/"}}, "qwen3"),
])
def test_served_name_defaults_to_the_model(source: dict, served: str) -> None:
    assert parse({"model": {"source": source}}).model.served_name == served
    assert parse({"model": {"source": source, "servedName": "x"}}).model.served_name == "x"


def test_gpus_follow_the_parallelism_unless_set() -> None:
    role = parse({"decode": {"parallelism": {"tensor": 1, "pipeline": 1}}}).decode
    assert (role.gpus, role.gpu_count) == (None, 1)
    assert parse({"decode": {"resources": {"gpus": 0}}}).decode.gpu_count == 0


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_pipeline_parallelism_is_refused_until_it_runs_with_a_connector(role: str) -> None:
    """Issue 15: engines run pipeline parallel, but not yet with the KV connector that every prefill and decode
    pod has, so a pod would fail to start: refused at admission instead."""
    with pytest.raises(SpecError) as err:
        parse({role: {"parallelism": {"pipeline": 2}}})
    assert err.value.path == f"spec.{role}.parallelism.pipeline"
    assert "does not run with a KV connector yet" in str(err.value) and "got 2" in str(err.value)


def test_prefill_and_decode_take_different_tensor_parallel_sizes() -> None:
    """Issue 15: connectors run with tensor parallelism, each side its own size; one GPU per shard by default."""
    s = parse({"prefill": {"parallelism": {"tensor": 1}}, "decode": {"parallelism": {"tensor": 4}}})
    assert (s.prefill.tensor_parallel, s.decode.tensor_parallel, s.decode.gpu_count) == (1, 4, 4)


def test_bounded_limits_have_finite_defaults() -> None:
    s = parse({})
    assert (s.engine.max_waiting, s.engine.request_timeout, s.router.request_timeout) == (256, 600, 600)
    s = parse({"engine": {"maxWaiting": 8, "requestTimeoutSeconds": 30}, "router": {"requestTimeoutSeconds": 40}})
    assert (s.engine.max_waiting, s.engine.request_timeout, s.router.request_timeout) == (8, 30, 40)


@pytest.mark.parametrize("bad, path", [
    ({"model": {"source": {"hostPath": {"path": "/models/x"}}}}, "spec.model.source.hostPath"),
    ({"engine": {"extraArgs": ["--seed", "1"]}}, "spec.engine.extraArgs"),
    ({"decode": {"extraArgs": ["--enforce-eager"]}}, "spec.decode.extraArgs"),
    ({"router": {"extraArgs": ["--api-key", "k"]}}, "spec.router.extraArgs"),
])
def test_host_path_and_extra_args_need_the_operators_permission(bad: dict, path: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(bad, permissions=spec.Permissions())
    assert (err.value.path, err.value.reason) == (path, "NotPermitted")
    assert "operator.allow" in str(err.value)
    parse(bad)  # allowed by the chart's switches


def test_network_policies_default_on_with_the_monitoring_namespace() -> None:
    s = parse({})
    assert s.network_policy == spec.NetworkPolicySpec(True, {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}})
    s = parse({"networkPolicy": {"enabled": False, "prometheusNamespaceSelector": {}}})
    assert s.network_policy == spec.NetworkPolicySpec(False, {})


def test_pass_through_fields_are_copies() -> None:
    raw = {"prefill": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}}
    s = parse(raw)
    s.prefill.tolerations[0]["key"] = "changed"
    assert raw["prefill"]["tolerations"][0]["key"] == "gpu"


INVALID = [
    # (spec, path in the error, words in the message)
    ({"prefill": {"replicas": -1}}, "spec.prefill.replicas", "must be >= 0"),
    ({"decode": {"replicas": True}}, "spec.decode.replicas", "must be int"),
    ({"decode": {"replicas": "2"}}, "spec.decode.replicas", "must be int"),
    ({"kvConnector": {"type": "nfs"}}, "spec.kvConnector.type", "must be one of shared-fs, grpc, redis"),
    ({"kvConnector": {"type": "redis"}}, "spec.kvConnector.redis", "needs redis.url or redis.deploy: true"),
    ({"kvConnector": {"type": "redis", "redis": {"deploy": False}}}, "spec.kvConnector.redis", "redis.url"),
    ({"kvConnector": {"type": "redis", "redis": {"url": "redis://r:6379", "deploy": True}}},
     "spec.kvConnector.redis", "not both"),
    ({"kvConnector": {"type": "redis", "redis": {"url": "http://r:6379"}}}, "spec.kvConnector.redis.url",
     "redis://"),
    ({"kvConnector": {"type": "shared-fs"}}, "spec.kvConnector.sharedFs.claimName", "ReadWriteMany"),
    ({"model": {"source": {}}}, "spec.model.source", "exactly one"),
    ({"model": {"source": {"bundled": "a", "hostPath": {"path": "/m"}}}}, "spec.model.source", "exactly one"),
    ({"model": {"source": {"huggingFace": {"id": "no-org"}}}}, "spec.model.source.huggingFace.id", "org/name"),
    ({"model": {"source": {"hostPath": {"path": "relative"}}}}, "spec.model.source.hostPath.path", "absolute"),
    ({"model": {"source": {"pvc": {}}}}, "spec.model.source.pvc.claimName", "is required"),
    ({"model": {"dtype": "int4"}}, "spec.model.dtype", "must be one of"),
    ({"model": {"maxModelLen": 0}}, "spec.model.maxModelLen", ">= 1"),
    ({"engine": {"gpuMemoryUtilization": 1.5}}, "spec.engine.gpuMemoryUtilization", "(0, 1]"),
    ({"engine": {"gpuMemoryUtilization": 0}}, "spec.engine.gpuMemoryUtilization", "(0, 1]"),
    ({"engine": {"kvCacheDtype": "int8"}}, "spec.engine.kvCacheDtype", "auto, fp8_e4m3"),
    ({"engine": {"blockSize": 0}}, "spec.engine.blockSize", ">= 1"),
    ({"engine": {"extraArgs": [1]}}, "spec.engine.extraArgs", "list of strings"),
    ({"engine": {"blockSzie": 16}}, "spec.engine", "unknown field(s) blockSzie"),
    ({"prefill": {"parallelism": {"tensor": 0}}}, "spec.prefill.parallelism.tensor", ">= 1"),
    ({"prefill": {"parallelism": {"tensor": 4}, "resources": {"gpus": 2}}}, "spec.prefill.resources.gpus",
     "cannot hold tensor x pipeline = 4"),
    ({"engine": {"maxWaiting": 0}}, "spec.engine.maxWaiting", ">= 1"),
    ({"networkPolicy": {"prometheusNamespaceSelector": {"name": "monitoring"}}},
     "spec.networkPolicy.prometheusNamespaceSelector", "unknown field(s) name"),
    ({"engine": {"requestTimeoutSeconds": 10**9}}, "spec.engine.requestTimeoutSeconds", "<= 86400"),
    ({"router": {"requestTimeoutSeconds": 0}}, "spec.router.requestTimeoutSeconds", ">= 1"),
    ({"kvConnector": {"type": "redis", "redis": {"url": "redis://:hunter2@r:6379"}}}, "spec.kvConnector.redis.url",
     "passwordSecretRef"),
    ({"kvConnector": {"type": "redis", "redis": {"deploy": True, "passwordSecretRef": {"name": "p"}}}},
     "spec.kvConnector.redis.passwordSecretRef", "generated password"),
    ({"router": {"plugins": [{"name": "magic"}]}}, "spec.router.plugins[0].name", "must be one of"),
    ({"router": {"plugins": [{"name": "load"}, {"name": "load"}]}}, "spec.router.plugins[1].name", "twice"),
    ({"router": {"plugins": [{"name": "load", "weight": -1}]}}, "spec.router.plugins[0].weight", ">= 0"),
    ({"router": {"apiKeySecretRef": {}}}, "spec.router.apiKeySecretRef.name", "is required"),
    ({"router": {"env": [{"value": "x"}]}}, "spec.router.env", "with a name"),
    ({"imagePullSecrets": ["regcred"]}, "spec.imagePullSecrets", "{name: ...}"),
    ({"imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy", "must be one of"),
    ({"routerr": {}}, "spec", "unknown field(s) routerr"),
    ({"engine": []}, "spec.engine", "must be an object"),
]


@pytest.mark.parametrize("bad, path, words", INVALID, ids=[p for _, p, _ in INVALID])
def test_invalid_specs_name_the_field(bad: dict, path: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(bad)
    assert err.value.path == path
    assert words in str(err.value)
    assert err.value.reason == "InvalidSpec"


@pytest.mark.parametrize("name", ["", "Chat", "1chat", "chat_1", "chat-", "x" * 51, None])
def test_names_must_fit_the_children(name) -> None:
    with pytest.raises(SpecError) as err:
        parse({}, name=name)
    assert err.value.path == "metadata.name"
