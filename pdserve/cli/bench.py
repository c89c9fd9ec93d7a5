"""``pdserve bench <kind>``: benchmark commands anyone can rerun (the benchmarks live in ``bench/``)."""

from __future__ import annotations

import argparse
import importlib
import sys

# kind -> (module with add_arguments/run, help)
KINDS: dict[str, tuple[str, str]] = {
    "throughput": ("pdserve.bench.throughput", "offline throughput on N requests (optionally vs transformers)"),
    "latency": ("pdserve.bench.latency", "batch-1 decode speed and prefill time (optionally vs transformers)"),
    "decode-profile": ("pdserve.bench.decode_profile", "decode steps at a fixed batch and context, timed and profiled"),
    "serve": ("pdserve.bench.serve", "online serving benchmark against an OpenAI-compatible endpoint"),
    "kv-transfer": ("pdserve.bench.kv_transfer", "KV transfer speed of a connector between two processes"),
    "kernels": ("pdserve.bench.kernels", "paged attention kernel vs scaled_dot_product_attention"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    for name, (module_name, help_text) in KINDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if (exc.name or "pdserve").split(".")[0] == "pdserve":
                raise  # a benchmark module of our own is missing: a bug, not an optional dependency
            # An optional dependency (triton for the kernels, matplotlib for plots) must not break the other kinds.
            p = sub.add_parser(name, help=f"{help_text} (unavailable: needs {exc.name})", add_help=False)
            p.set_defaults(_bench_missing=exc.name)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_bench_module=module)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_missing", None):
        print(f"pdserve bench {args.bench_kind}: unavailable, the Python package {args._bench_missing!r} is not "
              f"installed", file=sys.stderr)
        return 2
    result = args._bench_module.run(args)
    # A benchmark returns its exit code, or its result rows (the kernel benchmark, for programmatic callers).
    return result if isinstance(result, int) else 0
