"""``pdserve bench latency --peer vllm|pdserve``: the same prompts (every case: batch size and length) through
pdserve and the peer, each in a process of its own (bench/peer.py); roofline shares and MFU of both engines use
the device peaks pdserve's process measured on the same GPU."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from pdserve.bench.latency import LatencyResult, case_prompts, latency_result, print_results
from pdserve.bench.peer import peer_label, ratio, side_by_side
from pdserve.bench.peer_process import PeerError


def _results(name: str, record: dict[str, Any], output_len: int, figures: dict[str, Any],
             hf_config: Any) -> list[LatencyResult]:
    return [latency_result(name, c["batch_size"], c["input_len"], output_len, c["prefill_s"], c["total_s"], figures,
                           hf_config) for c in record["cases"]]


def _ratios(results: list[LatencyResult]) -> list[dict[str, Any]]:
    """pdserve's speed over the peer's per case (> 1: pdserve faster)."""
    ours = {(r.batch_size, r.prompt_len): r for r in results if r.engine == "pdserve"}
    return [{"batch_size": r.batch_size, "input_len": r.prompt_len,
             "prefill": ratio(r.prefill_s, ours[r.batch_size, r.prompt_len].prefill_s),
             "decode": ratio(ours[r.batch_size, r.prompt_len].decode_tokens_per_s, r.decode_tokens_per_s)}
            for r in results if r.engine != "pdserve"]


def run_with_peer(args: argparse.Namespace, cases: list[tuple[int, int]], kw: dict[str, Any]) -> int:
    from pdserve.engine.model_loader.resolve import resolve_model

    try:
        hf_config = resolve_model(kw["model"], kw["load_format"]).hf_config
        workload = {"task": "latency", "output_len": args.output_len, "iters": args.iters,
                    "cases": [{"prompts": p} for p in case_prompts(cases, hf_config.vocab_size)]}
        ours, theirs = side_by_side(args, kw, workload)
    except (PeerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    figures = {k: ours[k] for k in ("bandwidth", "matmul_peak", "weights", "per_token_params", "head_params",
                                    "kv_elem")}
    results = (_results("pdserve", ours, args.output_len, figures, hf_config)
               + _results(peer_label(args.peer), theirs, args.output_len, figures, hf_config))
    print_results(results, f"model={kw['model']} dtype={ours['dtype']} device={ours['device']}", figures)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": ours["device"], "model": kw["model"], "dtype": ours["dtype"], "peer": args.peer,
                       "peer_version": theirs.get("version"), "workload_digest": ours["workload_digest"],
                       "startup_s": {"pdserve": ours["startup_s"], peer_label(args.peer): theirs["startup_s"]},
                       **figures, "results": [asdict(r) for r in results], "ratios": _ratios(results)}, f, indent=2)
    return 0
