"""``pdserve operator render`` and the ``operator`` subcommand's wiring."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import yaml

from pdserve.operator import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minimal.yaml"


def run(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="pdserve operator")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    out = io.StringIO()
    if args.operator_func is cli._render:
        return cli._render(args, stdout=out), out.getvalue()
    return cli.run(args), ""


def test_render_prints_every_child(capsys) -> None:
    code, out = run(["render", "-f", str(EXAMPLE), "-n", "llm", "--default-image", "img:2"])
    assert code == 0
    objs = list(yaml.safe_load_all(out))
    assert [(o["kind"], o["metadata"]["name"]) for o in objs][:3] == [
        ("Secret", "smollm-cluster-secret"), ("ConfigMap", "smollm-config"), ("ServiceAccount", "smollm-router")]
    (secret,) = [o for o in objs if o["kind"] == "Secret"]
    assert "data" not in secret and "stringData" not in secret  # the operator generates it; render shows none
    assert {o["metadata"]["namespace"] for o in objs} == {"llm"}
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "img:2"
    assert "engine.json: |" in out  # the config is readable in the output, not an escaped string


def test_render_reports_an_invalid_spec(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text() + "  kvConnector:\n    type: carrier-pigeon\n")
    code, out = run(["render", "-f", str(bad)])
    assert (code, out) == (1, "")
    assert "spec.kvConnector.type: must be one of shared-fs, grpc, redis" in capsys.readouterr().err


def test_render_refuses_gated_fields_unless_allowed(tmp_path: Path, capsys) -> None:
    host = tmp_path / "host.yaml"
    host.write_text(EXAMPLE.read_text().replace("bundled: smollm2-135m-instruct", "hostPath: {path: /models/m}")
                    + "  decode:\n    extraArgs: [--enforce-eager]\n")
    assert run(["render", "-f", str(host)])[0] == 1
    assert "hostPath model sources are disabled" in capsys.readouterr().err
    assert run(["render", "-f", str(host), "--allow-host-path"])[0] == 1
    assert "spec.decode.extraArgs: raw extraArgs are disabled" in capsys.readouterr().err
    code, out = run(["render", "-f", str(host), "--allow-host-path", "--allow-extra-args"])
    assert code == 0 and "path: /models/m" in out and "--enforce-eager" in out


def test_render_without_an_inference_service(tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert run(["render", "-f", str(other)])[0] == 1
    assert "no InferenceService" in capsys.readouterr().err


def test_subcommand_is_wired_and_light() -> None:
    from pdserve.cli.main import SUBCOMMANDS

    assert SUBCOMMANDS["operator"][0] == "pdserve.operator.cli"
    # rendering never needs the operator's runtime dependencies
    code = ("import sys; import pdserve.operator.cli, pdserve.operator.render, pdserve.operator.crd; "
            "print(sorted(m for m in ('kopf', 'kubernetes', 'torch') if m in sys.modules))")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "[]"
