"""``pdserve operator run`` (the operator itself) and ``pdserve operator render`` (a dry run to read and diff).

kopf and the kubernetes client are imported only by ``run``, so ``render`` works with PyYAML alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any, Iterable, TextIO

from pdserve.operator import constants as c


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``run`` and ``render`` under ``pdserve operator``."""
    sub = parser.add_subparsers(dest="operator_command", metavar="ACTION", required=True)
    run_p = sub.add_parser("run", help="run the operator against the cluster of the current credentials",
                           description="Run the operator. In a pod it uses its service account, elsewhere the "
                                       "kubeconfig ($KUBECONFIG or ~/.kube/config).")
    scope = run_p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable; globs like 'team-*' work)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    peer = run_p.add_mutually_exclusive_group()
    peer.add_argument("--peering", default="pdserve", metavar="NAME",
                      help="kopf peering object used to elect one active replica (default: pdserve)")
    peer.add_argument("--standalone", action="store_true", help="no peering: only safe with a single replica")
    run_p.add_argument("--priority", type=int, default=None,
                       help="peering priority; the highest live replica is active (default: random)")
    run_p.add_argument("--default-image", default=c.DEFAULT_IMAGE,
                       help="image for InferenceServices that do not set spec.image")
    run_p.add_argument("--status-interval", type=float, default=10.0, metavar="SECONDS",
                       help="how often each InferenceService's status is recomputed from its children")
    run_p.add_argument("--liveness-port", type=int, default=8080, help="port of /healthz (0: off)")
    run_p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _add_permission_arguments(run_p)
    run_p.set_defaults(operator_func=_run)

    render_p = sub.add_parser("render", help="print the objects the operator would create for a manifest",
                              description="Read InferenceService manifests and print, as YAML, every object the "
                                          "operator would create for them. Nothing is sent to a cluster.")
    render_p.add_argument("-f", "--filename", required=True, help="YAML file with InferenceService(s); '-' = stdin")
    render_p.add_argument("--namespace", "-n", default="default",
                          help="namespace for manifests that do not name one (default: default)")
    render_p.add_argument("--default-image", default=c.DEFAULT_IMAGE, help="image when spec.image is not set")
    _add_permission_arguments(render_p)
    render_p.set_defaults(operator_func=_render)


def _add_permission_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-host-path", action="store_true",
                        help="accept hostPath model sources (mount a node's directory; default: refused)")
    parser.add_argument("--allow-extra-args", action="store_true",
                        help="accept raw extraArgs for the pods' command lines (default: refused)")


def permissions(args: argparse.Namespace) -> Any:
    from pdserve.operator.spec import Permissions

    return Permissions(host_path=args.allow_host_path, extra_args=args.allow_extra_args)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pdserve operator``."""
    return int(args.operator_func(args) or 0)


def _run(args: argparse.Namespace) -> int:
    from pdserve.operator.handlers import OperatorOptions
    from pdserve.operator.runner import run_operator

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = OperatorOptions(namespaces=tuple(args.namespace), peering=None if args.standalone else args.peering,
                              priority=args.priority, default_image=args.default_image,
                              status_interval=args.status_interval, liveness_port=args.liveness_port or None,
                              permissions=permissions(args))
    asyncio.run(run_operator(options))
    return 0


def render_documents(docs: Iterable[Any], *, namespace: str, default_image: str,
                     allow: Any = None) -> list[dict[str, Any]]:
    """Every child object of every InferenceService in ``docs`` (other kinds are skipped)."""
    from pdserve.operator import render, spec

    out: list[dict[str, Any]] = []
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != c.KIND:
            continue
        if doc.get("apiVersion") != c.API_VERSION:
            raise spec.SpecError("apiVersion", f"must be {c.API_VERSION}, got {doc.get('apiVersion')!r}")
        meta = doc.get("metadata") or {}
        parsed = spec.parse(meta.get("name"), meta.get("namespace") or namespace, doc.get("spec"),
                            default_image=default_image, permissions=allow or spec.Permissions(),
                            annotations=meta.get("annotations") or {})
        out += render.render(parsed)
    return out


def _render(args: argparse.Namespace, stdout: TextIO = sys.stdout) -> int:
    import yaml

    from pdserve.operator.spec import SpecError

    try:
        if args.filename == "-":
            docs = list(yaml.safe_load_all(sys.stdin))
        else:
            with open(args.filename, encoding="utf-8") as fh:
                docs = list(yaml.safe_load_all(fh))
        objs = render_documents(docs, namespace=args.namespace, default_image=args.default_image,
                                allow=permissions(args))
    except (OSError, yaml.YAMLError, SpecError) as exc:
        print(f"pdserve operator render: {exc}", file=sys.stderr)
        return 1
    if not objs:
        print(f"pdserve operator render: no {c.KIND} in {args.filename}", file=sys.stderr)
        return 1
    stdout.write(dump_yaml(objs))
    return 0


def dump_yaml(objs: list[dict[str, Any]]) -> str:
    """Multi-document YAML for people: no anchors, multi-line strings (the ConfigMap's JSON) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, str_representer)
    return yaml.dump_all(objs, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)
