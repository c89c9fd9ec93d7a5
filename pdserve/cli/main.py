"""The ``pdserve`` command: one entry point, one subcommand per role.

Each subcommand lives in its own module, imported only when used (the operator must not import torch, the
engine must not import kopf). A module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pdserve.cli.generate", "generate text offline with a model"),
    "bench": ("pdserve.cli.bench", "benchmarks: throughput, latency, serve, kv-transfer, kernels"),
    "serve": ("pdserve.services.api.cli", "run a monolithic OpenAI-compatible HTTP + gRPC server"),
    "prefill": ("pdserve.services.prefill.cli", "run a prefill server (disaggregated serving)"),
    "decode": ("pdserve.services.decode.cli", "run a decode server (disaggregated serving)"),
    "router": ("pdserve.services.router.cli", "run the router in front of prefill and decode servers"),
    "proxy": ("pdserve.services.proxy.cli", "a minimal prefill-then-decode proxy (the router does this and more)"),
    "up": ("pdserve.cli.up", "start the whole stack (router, prefill, decode) on this machine"),
    "sim-engine": ("pdserve.sim.engine_cli", "a simulated engine pod: real APIs, modelled step times, no GPU"),
    "sim": ("pdserve.sim.cluster_cli", "simulate a cluster of prefill/decode pods and an autoscaler in virtual time"),
    "operator": ("pdserve.operator.cli", "the Kubernetes operator: run it, or render what it would create"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A missing optional dependency must not break the other subcommands; say so when this one is used.
            missing = exc.name or str(exc)
            p = sub.add_parser(name, help=f"{help_text} (unavailable: needs {missing})", add_help=False)
            p.set_defaults(_missing=missing)
            continue
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        sub.choices[name].set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "_missing", None):
        print(f"pdserve {args.command}: unavailable, the Python package {args._missing!r} is not installed",
              file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
