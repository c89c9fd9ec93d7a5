"""Pure rendering, exactly: golden files for the examples, and the properties every rendering must have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pdserve.operator import constants as c
from pdserve.operator import render, spec
from pdserve.operator.cli import dump_yaml, render_documents

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"


def rendered(path: Path) -> list[dict]:
    return render_documents(yaml.safe_load_all(path.read_text()), namespace="default", default_image=c.DEFAULT_IMAGE)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_render_exactly_as_recorded(example: Path) -> None:
    """Regenerate after an intended change with:
    for f in examples/*.yaml; do pdserve operator render -f $f > tests/operator/golden/$(basename $f); done"""
    assert dump_yaml(rendered(example)) == (GOLDEN / example.name).read_text()


def walk(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_rendering_is_safe_and_consistent(example: Path) -> None:
    objs = rendered(example)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names))
    service = objs[0]["metadata"]["labels"][c.LABEL_SERVICE]
    for obj in objs:
        # JSON merge patches treat null as "delete": a rendering never contains one
        assert [p for p, v in walk(obj) if v is None] == []
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63 and meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY
        assert (obj["apiVersion"], obj["kind"], meta["name"]) in render.child_keys(service)
        if obj["kind"] != "Deployment":
            continue
        template = obj["spec"]["template"]
        # the selector is a subset of the pod labels and never mentions a mutable property
        assert obj["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert set(obj["spec"]["selector"]["matchLabels"]) == {c.LABEL_SERVICE, c.LABEL_ROLE}
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for ctr in pod["containers"] + pod.get("initContainers", []):
            assert ctr["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}}


def parse(s: dict, name: str = "chat") -> spec.ServiceSpec:
    return spec.parse(name, "ns", s, permissions=spec.Permissions(host_path=True, extra_args=True))


def by_key(objs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_replicas_change_only_their_deployment() -> None:
    before = by_key(render.render(parse({})))
    after = by_key(render.render(parse({"prefill": {"replicas": 4}})))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("Deployment", "chat-prefill")}
    assert after[("Deployment", "chat-prefill")]["spec"]["template"] == \
        before[("Deployment", "chat-prefill")]["spec"]["template"]


@pytest.mark.parametrize("change, rolled", [
    ({"engine": {"blockSize": 32}}, {"prefill", "decode", "router"}),  # the router hashes prompts by blocks too
    ({"engine": {"maxNumSeqs": 64}}, {"prefill", "decode"}),
    ({"router": {"pdThreshold": 1024}}, {"router"}),
    ({"decode": {"extraArgs": ["--enforce-eager"]}}, {"decode"}),
    ({"model": {"servedName": "chat-model"}}, {"prefill", "decode", "router"}),
])
def test_config_changes_roll_exactly_the_pods_that_read_it(change: dict, rolled: set[str]) -> None:
    before = by_key(render.render(parse({})))
    after = by_key(render.render(parse(change)))
    templates = {role for role in c.ROLES if before[("Deployment", f"chat-{role}")]["spec"]["template"]
                 != after[("Deployment", f"chat-{role}")]["spec"]["template"]}
    assert templates == rolled
    assert before[("ConfigMap", "chat-config")] != after[("ConfigMap", "chat-config")]


def test_engine_command_line() -> None:
    s = parse({"model": {"source": {"pvc": {"claimName": "w", "path": "llama"}}, "maxModelLen": 4096},
               "engine": {"enablePrefixCaching": False, "extraArgs": ["--seed", "7"]},
               "decode": {"resources": {"gpus": 0}, "extraArgs": ["--enforce-eager"]},
               "kvConnector": {"type": "shared-fs", "sharedFs": {"claimName": "kv"}}})
    assert render.pods.engine_args(s, "decode") == [
        "decode", "--host", "0.0.0.0", "--port", "8000", "--grpc-port", "50051", "--metrics-port", "9090",
        "--max-waiting", "256", "--request-timeout", "600", "--model", "/models/llama",
        "--served-model-name", "llama", "--kv-connector", "shared-fs", "--kv-path", "/var/lib/pdserve/kv",
        "--dtype", "auto", "--max-model-len", "4096", "--block-size", "16", "--kv-cache-dtype", "auto",
        "--gpu-memory-utilization", "0.9", "--max-num-seqs", "128", "--max-num-batched-tokens", "2048",
        "--no-enable-prefix-caching", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
        "--device", "cpu", "--seed", "7", "--enforce-eager"]
    config = json.loads(render.config_map(s)["data"]["engine.json"])
    assert config["roles"]["decode"]["command"].startswith("pdserve decode --host 0.0.0.0")
    assert config["kvTransfer"] == {"connector": "shared-fs", "kvPath": "/var/lib/pdserve/kv", "claimName": "kv"}


def test_router_command_line_and_routing_file() -> None:
    s = parse({"router": {"plugins": [{"name": "load", "weight": 2}, {"name": "session-affinity"}],
                          "pdThreshold": 100, "requestTimeoutSeconds": 90, "apiKeySecretRef": {"name": "keys"}}})
    assert render.pods.router_args(s) == [
        "router", "--host", "0.0.0.0", "--port", "8000", "--metrics-port", "9090", "--request-timeout", "90",
        "--model", "smollm2-135m-instruct",
        "--served-model-name", "smollm2-135m-instruct", "--block-size", "16", "--discovery", "kubernetes",
        "--namespace", "ns", "--prefill-selector", "pdserve.io/service=chat,pdserve.io/role=prefill",
        "--decode-selector", "pdserve.io/service=chat,pdserve.io/role=decode", "--pod-grpc-port", "50051",
        "--pod-kv-events-port", "5557", "--routing-config", "/etc/pdserve/routing.json"]  # no --api-key: env
    assert render.routing_config(s) == {
        "decode": {"filters": [{"type": "queue-threshold", "max_waiting": 64}],
                   "scorers": [{"type": "load", "weight": 2.0}, {"type": "session-affinity", "weight": 1.0}],
                   "picker": {"type": "max-score"}},
        "prefill": {"scorers": [{"type": "load", "weight": 2.0}], "picker": {"type": "max-score"}},
        "pd_decider": {"type": "prefix-aware", "min_prompt_tokens": 100}}
    env = by_key(render.render(s))[("Deployment", "chat-router")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "PDSERVE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}} in env


def test_routing_file_is_accepted_by_the_router() -> None:
    routing = pytest.importorskip("pdserve.services.router.routing_config")
    plugins = pytest.importorskip("pdserve.services.router.plugins")
    registry = plugins.default_registry()
    every = parse({"router": {"plugins": [{"name": n} for n in spec.ROUTER_SCORERS]}})
    parsed = routing.parse_routing_spec(json.loads(render.config_map(every)["data"]["routing.json"]))
    assert {p.type for p in parsed.decode.scorers} == set(spec.ROUTER_SCORERS)
    assert set(registry.names("scorer")) == set(spec.ROUTER_SCORERS), "the CRD follows the router's scorers"
    assert {"queue-threshold"} <= set(registry.names("filter"))
    assert {"prefix-aware"} <= set(registry.names("pd-decider"))


def test_user_env_overrides_defaults_and_gpus_become_limits() -> None:
    s = parse({"decode": {"env": [{"name": "HOME", "value": "/home/x"}, {"name": "A", "value": "1"}],
                          "resources": {"gpus": 2, "gpuResource": "amd.com/gpu", "limits": {"memory": "8Gi"}}}})
    ctr = by_key(render.render(s))[("Deployment", "chat-decode")]["spec"]["template"]["spec"]["containers"][0]
    assert [e["name"] for e in ctr["env"]] == ["POD_IP", "XDG_CACHE_HOME", "HF_HOME", "PDSERVE_CLUSTER_SECRET",
                                                "HOME", "A"]
    assert ctr["resources"] == {"limits": {"memory": "8Gi", "amd.com/gpu": "2"}}


def test_optional_children() -> None:
    plain = by_key(render.render(parse({})))
    assert ("Deployment", "chat-redis") not in plain and ("ServiceMonitor", "chat") not in plain
    full = by_key(render.render(parse({"kvConnector": {"type": "redis", "redis": {"deploy": True}},
                                       "monitoring": {"serviceMonitor": True}})))
    assert {("Deployment", "chat-redis"), ("Service", "chat-redis"), ("ServiceMonitor", "chat")} <= set(full)
    monitor = full[("ServiceMonitor", "chat")]["spec"]
    assert monitor["selector"]["matchLabels"] == {c.LABEL_SERVICE: "chat", c.LABEL_METRICS: "true"}
    assert monitor["endpoints"][0]["relabelings"] == [
        {"sourceLabels": ["__meta_kubernetes_pod_label_pdserve_io_role"], "targetLabel": "role"}]
    external = by_key(render.render(parse({"kvConnector": {"type": "redis", "redis": {"url": "redis://r:1/2"}}})))
    assert ("Deployment", "chat-redis") not in external
