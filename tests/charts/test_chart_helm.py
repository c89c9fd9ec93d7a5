"""The Helm chart, rendered by the real helm binary: lint, validity for Kubernetes 1.29 and 1.33, RBAC, hardening."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pdserve"
VALUES = {"default": None, **{p.stem: p for p in sorted((CHART / "ci").glob("*-values.yaml"))}}
K8S_VERSIONS = ("1.29.0", "1.33.0")


def template(helm, values: Path | None, *extra: str) -> list[dict]:
    args = ["template", "pdserve", str(CHART), "--namespace", "pdserve-system", "--include-crds", *extra]
    if values is not None:
        args += ["--values", str(values)]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def test_there_are_at_least_three_values_files_besides_the_defaults() -> None:
    assert len(VALUES) >= 4


@pytest.mark.parametrize("name", VALUES)
def test_lint_strict(helm, name: str) -> None:
    args = ["lint", "--strict", str(CHART)] + (["--values", str(VALUES[name])] if VALUES[name] else [])
    assert "0 chart(s) failed" in helm(*args)


@pytest.mark.parametrize("name", VALUES)
def test_every_rendered_object_is_valid(helm, manifest_problems, name: str) -> None:
    objs = template(helm, VALUES[name])
    assert objs
    for version in K8S_VERSIONS:
        assert manifest_problems(objs, version) == []


def test_values_schema_rejects_mistakes(helm, tmp_path: Path) -> None:
    for bad, words in [({"operator": {"replicas": -1}}, "operator.replicas"),
                       ({"operator": {"watchNamespaces": ["Bad_NS"]}}, "watchNamespaces"),
                       ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
                       ({"serviceMonitor": {"enabeld": True}}, "enabeld"),
                       ({"example": {"name": "Has Spaces"}}, "example.name")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(RuntimeError, match=words):
            template(helm, path)


def test_crds_are_the_operators(helm) -> None:
    crds = {o["metadata"]["name"]: o for o in template(helm, None) if o["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", "inferenceservices.pdserve.io"}
    from pdserve.operator import crd

    assert crds["inferenceservices.pdserve.io"] == crd.crd()


def rules_of(objs: list[dict], name: str) -> list[dict]:
    (role,) = [o for o in by_kind(objs, "ClusterRole") if o["metadata"]["name"] == name]
    return role["rules"]


def test_rbac_is_least_privilege(helm) -> None:
    objs = template(helm, None)
    for role in by_kind(objs, "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    rules = {(g, r): set(rule["verbs"]) for rule in rules_of(objs, "pdserve") for g in rule["apiGroups"]
             for r in rule["resources"]}
    # children are read and written by name only: no list or watch of them -- Secrets included: the operator reads
    # only the ones it generates, by name, and can never list the namespace's other Secrets
    for child in [("", "configmaps"), ("", "services"), ("apps", "deployments"), ("policy", "poddisruptionbudgets"),
                  ("rbac.authorization.k8s.io", "roles"), ("monitoring.coreos.com", "servicemonitors"),
                  ("", "secrets"), ("networking.k8s.io", "networkpolicies")]:
        assert rules[child] == {"get", "create", "patch", "delete"}, child
    assert ("discovery.k8s.io", "endpointslices") not in rules, "the router discovers pods, not EndpointSlices"
    # what the operator grants to each router, it must hold itself
    from pdserve.operator import render, spec

    router_role = next(o for o in render.render(spec.parse("x", "ns", {})) if o["kind"] == "Role")
    for rule in router_role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert set(rule["verbs"]) <= rules[(group, resource)]


def test_namespaced_mode_binds_only_the_watched_namespaces(helm) -> None:
    objs = template(helm, VALUES["ha-namespaced-values"])
    bindings = {(o["metadata"].get("namespace"), o["roleRef"]["name"]) for o in by_kind(objs, "RoleBinding")}
    assert bindings == {("llm", "pdserve"), ("llm-staging", "pdserve")}
    assert [o["roleRef"]["name"] for o in by_kind(objs, "ClusterRoleBinding")] == ["pdserve-cluster"]
    peerings = by_kind(objs, "KopfPeering")
    assert {o["metadata"]["namespace"] for o in peerings} == {"llm", "llm-staging"} and not by_kind(
        objs, "ClusterKopfPeering")
    (deployment,) = by_kind(objs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ["--namespace=llm", "--namespace=llm-staging", "--peering=pdserve"] == [
        a for a in args if a.startswith(("--namespace", "--peering", "--standalone"))]
    # a namespaced operator peers through KopfPeerings: no cluster-wide peering object, nor the right to it
    cluster_rules = rules_of(objs, "pdserve-cluster")
    assert not any("clusterkopfpeerings" in r["resources"] for r in cluster_rules)
    assert any("clusterkopfpeerings" in r["resources"] for r in rules_of(template(helm, None), "pdserve-cluster"))
    # the chart renders no pod policy of its own: the operator's per-port policies are the only ones (policies
    # add up, so a broad one here would reopen every port)
    assert [o["metadata"]["name"] for o in by_kind(objs, "NetworkPolicy")] == ["pdserve"]


@pytest.mark.parametrize("name", VALUES)
def test_operator_pod_is_hardened(helm, name: str) -> None:
    objs = template(helm, VALUES[name])
    (deployment,) = by_kind(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["command"] == ["pdserve"] and container["args"][:2] == ["operator", "run"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    # the operator's command line parses with the real parser (a renamed flag fails here, not in a crash loop)
    from pdserve.cli.main import build_parser

    args, unknown = build_parser().parse_known_args(container["args"])
    assert unknown == [] and args.command == "operator" and args.operator_command == "run"
    trusting = name == "ha-namespaced-values"  # the one values file that allows hostPath and extraArgs
    assert (args.allow_host_path, args.allow_extra_args) == (trusting, trusting)


def test_default_install(helm) -> None:
    objs = template(helm, None)
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == ["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                     "CustomResourceDefinition", "Deployment", "NetworkPolicy", "ServiceAccount"]
    (deployment,) = by_kind(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=pdserve" in args and "--default-image=ghcr.io/pdserve/pdserve:0.1.0" in args
    (policy,) = by_kind(objs, "NetworkPolicy")
    assert policy["spec"]["ingress"] == [] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_dashboards_ship_with_the_grafana_sidecar_label(helm) -> None:
    objs = template(helm, VALUES["example-values"])
    maps = by_kind(objs, "ConfigMap")
    assert {m["metadata"]["namespace"] for m in maps} == {"grafana"}
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert m["metadata"]["annotations"] == {"grafana_folder": "pdserve"}
        ((name, text),) = m["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())
    assert {n for m in maps for n in m["data"]} == {p.name for p in (CHART / "dashboards").glob("*.json")}


def test_optional_parts(helm) -> None:
    minimal = template(helm, VALUES["minimal-values"])
    assert sorted({o["kind"] for o in minimal}) == ["CustomResourceDefinition", "Deployment"]
    (deployment,) = by_kind(minimal, "Deployment")
    assert "--standalone" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "pdserve-operator"
    example = template(helm, VALUES["example-values"])
    (isvc,) = by_kind(example, "InferenceService")
    assert isvc["metadata"] == {"name": "smollm-cpu", "namespace": "pdserve-system", "labels": isvc["metadata"][
        "labels"]}
    monitor = by_kind(template(helm, VALUES["ha-namespaced-values"]), "ServiceMonitor")
    assert monitor[0]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
