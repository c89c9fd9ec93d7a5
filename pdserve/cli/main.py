"""The ``pdserve`` command: one entry point, one subcommand per role.

Each subcommand lives in its own module, imported only when used (the operator must not import torch, the
engine must not import kopf). A module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pdserve import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pdserve.cli.generate", "generate text offline with a model"),
    "bench": ("pdserve.cli.bench", "benchmarks: throughput, latency, serve, tune, kv-transfer, kernels"),
    "serve": ("pdserve.services.api.cli", "run a monolithic OpenAI-compatible HTTP + gRPC server"),
    "prefill": ("pdserve.services.prefill.cli", "run a prefill server (disaggregated serving)"),
    "decode": ("pdserve.services.decode.cli", "run a decode server (disaggregated serving)"),
    "router": ("pdserve.services.router.cli", "run the router in front of prefill and decode servers"),
    "up": ("pdserve.cli.up", "start the whole stack (router, prefill, decode) on this machine"),
    "sim-engine": ("pdserve.sim.engine_cli", "a simulated engine pod: real APIs, modelled step times, no GPU"),
    "sim": ("pdserve.sim.cluster_cli", "simulate a cluster of prefill/decode pods and an autoscaler in virtual time"),
    "sim-check": ("pdserve.sim.check_cli", "replay a trace through the real engine and the simulator, compare"),
    "operator": ("pdserve.operator.cli", "the Kubernetes operator: run it, or render what it would create"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving.")
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_lazy_subcommands(sub, SUBCOMMANDS, prog="pdserve", key="_module")
    return parser


def add_lazy_subcommands(sub: argparse._SubParsersAction, table: dict[str, tuple[str, str]], *, prog: str,
                         key: str) -> None:
    """One subcommand per entry of ``table`` (name -> (module, one-line help)); each module provides
    ``add_arguments(parser)`` and is stored in ``args.<key>``. A missing optional dependency (kopf for the
    operator, triton for the kernel benchmark) must not break the other subcommands: that one is listed as
    unavailable and says so when used. A missing pdserve module is a bug and raises."""
    for name, (module_name, help_text) in table.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if (exc.name or "pdserve").split(".")[0] == "pdserve":
                raise
            p = sub.add_parser(name, help=f"{help_text} (unavailable: needs {exc.name})", add_help=False)
            p.set_defaults(_missing=exc.name, _missing_command=f"{prog} {name}")
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(**{key: module})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "_missing", None):
        print(f"{args._missing_command}: unavailable, the Python package {args._missing!r} is not installed",
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
