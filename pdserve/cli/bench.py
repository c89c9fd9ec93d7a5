"""``pdserve bench <kind>``: benchmark commands anyone can rerun."""

from __future__ import annotations

import argparse
import importlib

# kind -> (module with add_arguments/run, help)
KINDS: dict[str, tuple[str, str]] = {
    "throughput": ("pdserve.bench.throughput", "offline throughput on N requests (optionally vs transformers)"),
    "latency": ("pdserve.bench.latency", "batch-1 decode speed and prefill time (optionally vs transformers)"),
    "structured": ("pdserve.bench.structured", "decode throughput with a JSON Schema vs unconstrained, cold compile"),
    "serve": ("pdserve.services.bench.serve", "online serving benchmark against an OpenAI-compatible endpoint"),
    "kv-transfer": ("pdserve.engine.kv_transfer.bench", "KV transfer speed of a connector between two processes"),
    "kernels": ("pdserve.kernels.bench", "paged attention kernel vs scaled_dot_product_attention"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    for name, (module_name, help_text) in KINDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_bench_module=module)


def run(args: argparse.Namespace) -> int:
    result = args._bench_module.run(args)
    # A benchmark returns its exit code, or its result rows (the kernel benchmark, for programmatic callers).
    return result if isinstance(result, int) else 0
