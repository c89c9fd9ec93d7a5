"""``pdserve bench throughput --peer vllm|pdserve``: the offline throughput workload through pdserve and the peer,
each in a process of its own (bench/peer.py), printed as one table with the ratio."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from pdserve.bench.peer import peer_label, ratio, side_by_side
from pdserve.bench.peer_process import PeerError
from pdserve.bench.throughput import DecodeRoofline, ThroughputResult, print_roofline, print_table
from pdserve.bench.workload import BenchRequest, random_requests, sharegpt_requests
from pdserve.cli.engine_args import engine_kwargs


def build_requests(args: argparse.Namespace, kw: dict[str, Any]) -> list[BenchRequest]:
    """The workload, made once here for both engines (the same generator as the in-process benchmark)."""
    from pdserve.engine.model_loader.resolve import resolve_model

    resolved = resolve_model(kw["model"], kw["load_format"])
    if not args.dataset:
        return random_requests(args.num_prompts, args.input_len, args.output_len, resolved.hf_config.vocab_size,
                               args.bench_seed)
    if resolved.tokenizer_path is None:
        raise ValueError("a ShareGPT dataset needs a model with a tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer_path)
    max_len = kw["max_model_len"] or resolved.hf_config.max_position_embeddings
    return sharegpt_requests(args.dataset, args.num_prompts, tokenizer, max_len, args.bench_seed)


def _result(name: str, record: dict[str, Any]) -> ThroughputResult:
    return ThroughputResult(name, record["num_requests"], record["elapsed_s"], record["input_tokens"],
                            record["output_tokens"])


def run_with_peer(args: argparse.Namespace) -> int:
    kw = engine_kwargs(args)
    try:
        requests = build_requests(args, kw)
        workload = {"task": "throughput", "requests": [[r.prompt_token_ids, r.output_len] for r in requests]}
        ours, theirs = side_by_side(args, kw, workload)
    except (PeerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    label = peer_label(args.peer)
    results = [_result("pdserve", ours), _result(label, theirs)]
    print_table(results, ours["device"], kw["model"], ours["dtype"])
    roof_fields = {f.name for f in fields(DecodeRoofline)}
    roof = DecodeRoofline(**{k: v for k, v in ours["decode_roofline"].items() if k in roof_fields})
    print_roofline(roof)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": ours["device"], "model": kw["model"], "dtype": ours["dtype"], "peer": args.peer,
                       "peer_version": theirs.get("version"), "workload_digest": ours["workload_digest"],
                       "startup_s": {"pdserve": ours["startup_s"], label: theirs["startup_s"]},
                       "results": [r.as_dict() for r in results],
                       "ratio_output_tokens_per_s": ratio(results[0].output_tokens_per_s,
                                                          results[1].output_tokens_per_s),
                       "decode_roofline": roof.as_dict()}, f, indent=2)
    return 0
