"""Every command line the operator renders is parsed by the real ``pdserve`` parser (issue 12, item 6).

The golden files compare argument lists as strings; only the parser knows whether a flag still exists. A flag
renamed or removed in a CLI fails here, not in a pod's crash loop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from pdserve.cli.main import build_parser
from pdserve.operator import constants as c
from pdserve.operator import render, spec
from pdserve.operator.cli import render_documents

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# Specs that reach the renderer's other branches: each connector, CPU pods, a PVC model, no prefix caching.
VARIANTS = [
    {"kvConnector": {"type": "shared-fs", "sharedFs": {"claimName": "kv"}}, "model": {"maxModelLen": 4096}},
    {"kvConnector": {"type": "redis", "redis": {"url": "redis://r:6379/0", "passwordSecretRef": {"name": "p"}}},
     "decode": {"resources": {"gpus": 0}}, "prefill": {"resources": {"gpus": 0}}},
    {"model": {"source": {"pvc": {"claimName": "w", "path": "llama"}}, "dtype": "bfloat16"},
     "engine": {"enablePrefixCaching": False, "kvCacheDtype": "fp8_e4m3", "maxWaiting": 7,
                "requestTimeoutSeconds": 30}, "router": {"requestTimeoutSeconds": 45}},
]
PARSER = build_parser()


def containers(objs: list[dict]) -> dict[str, dict]:
    """role -> the pdserve container of that role's Deployment."""
    out = {}
    for obj in objs:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"].rsplit("-", 1)[-1] in c.ROLES:
            ctr = obj["spec"]["template"]["spec"]["containers"][0]
            out[obj["metadata"]["name"].rsplit("-", 1)[-1]] = ctr
    return out


def parse_argv(ctr: dict) -> argparse.Namespace:
    assert ctr["command"] == ["pdserve"]
    args, unknown = PARSER.parse_known_args(ctr["args"])
    assert unknown == [], f"flags that `pdserve {ctr['args'][0]}` does not know: {unknown}"
    return args


def renderings() -> list[tuple[str, list[dict]]]:
    out = [(p.name, render_documents(yaml.safe_load_all(p.read_text()), namespace="default",
                                     default_image=c.DEFAULT_IMAGE)) for p in EXAMPLES]
    out += [(f"variant{i}", render.render(spec.parse("chat", "ns", v))) for i, v in enumerate(VARIANTS)]
    return out


@pytest.mark.parametrize("name, objs", renderings(), ids=[n for n, _ in renderings()])
def test_every_rendered_command_line_parses(name: str, objs: list[dict]) -> None:
    ctrs = containers(objs)
    assert set(ctrs) == set(c.ROLES)
    for role, ctr in ctrs.items():
        args = parse_argv(ctr)
        assert args.command == role
        assert args.metrics_port == c.METRICS_PORT and args.port == c.HTTP_PORT
        assert args.request_timeout > 0, "no unbounded request time on any pod"
        assert getattr(args, "api_key", None) is None, "the API key comes from the environment, never argv"
        if role in c.ENGINE_ROLES:
            assert args.max_waiting > 0 and args.grpc_port == c.GRPC_PORT
            assert args.tensor_parallel_size == args.pipeline_parallel_size == 1


def test_parsed_values_are_the_specs() -> None:
    s = spec.parse("chat", "ns", VARIANTS[2])
    ctrs = containers(render.render(s))
    decode, router = parse_argv(ctrs["decode"]), parse_argv(ctrs["router"])
    assert (decode.max_waiting, decode.request_timeout, router.request_timeout) == (7, 30.0, 45.0)
    assert (decode.model, decode.dtype, decode.kv_cache_dtype) == ("/models/llama", "bfloat16", "fp8_e4m3")
    assert decode.enable_prefix_caching is False
    assert (router.model, router.block_size, router.discovery) == ("/models/llama", 16, "kubernetes")
    cpu = containers(render.render(spec.parse("chat", "ns", VARIANTS[1])))
    assert parse_argv(cpu["prefill"]).device == "cpu"
