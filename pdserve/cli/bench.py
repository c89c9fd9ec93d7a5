"""``pdserve bench <kind>``: benchmark commands anyone can rerun (the benchmarks live in ``bench/``)."""

from __future__ import annotations

import argparse

from pdserve.cli.main import add_lazy_subcommands

# kind -> (module with add_arguments/run, help)
KINDS: dict[str, tuple[str, str]] = {
    "throughput": ("pdserve.bench.throughput", "offline throughput on N requests (optionally vs transformers)"),
    "latency": ("pdserve.bench.latency", "batch-1 decode speed and prefill time (optionally vs transformers)"),
    "decode-profile": ("pdserve.bench.decode_profile", "decode steps at a fixed batch and context, timed and profiled"),
    "structured": ("pdserve.bench.structured", "decode throughput with a JSON Schema vs unconstrained, cold compile"),
    "serve": ("pdserve.bench.serve", "online serving benchmark against an OpenAI-compatible endpoint"),
    "tune": ("pdserve.bench.tune", "search engine settings for the highest goodput under SLOs"),
    "kv-transfer": ("pdserve.bench.kv_transfer", "KV transfer speed of a connector between two processes"),
    "kernels": ("pdserve.bench.kernels", "paged attention kernel vs scaled_dot_product_attention"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    add_lazy_subcommands(sub, KINDS, prog="pdserve bench", key="_bench_module")


def run(args: argparse.Namespace) -> int:
    result = args._bench_module.run(args)
    # A benchmark returns its exit code, or its result rows (the kernel benchmark, for programmatic callers).
    return result if isinstance(result, int) else 0
