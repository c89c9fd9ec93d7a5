"""``pdserve bench structured``: the cost of structured output, offline, on one engine.

Runs the same batch twice, unconstrained (greedy) and constrained by a JSON Schema (greedy), and reports each
run's pure-decode throughput (tokens of pure-decode steps / their time, from the engine core's step records, so
answers of different lengths compare per step) with the mean decode batch, plus the compile time of a cold schema
(a schema not seen before, compiled for the model's vocabulary). A constrained answer ends when its schema does,
so the decode batch shrinks earlier than an unconstrained one that ignores EOS: compare at the reported batch.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs

# Nested objects, arrays, enums and bounded numbers: the shape issue 14's acceptance asks for.
DEFAULT_SCHEMA = {"type": "array", "minItems": 1, "items": {
    "type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": -1, "maximum": 1}, "maxItems": 8}},
    "required": ["id", "name", "kind", "scores"], "additionalProperties": False}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64, help="sequences decoded together")
    parser.add_argument("--output-len", type=int, default=256, help="max_tokens of every sequence")
    parser.add_argument("--schema", default=None, help="a JSON Schema file (default: a nested array of objects)")
    parser.add_argument("--min-items", type=int, default=1,
                        help="minItems of the default schema: a value the answers cannot reach keeps every "
                             "constrained sequence decoding, so both runs compare at the same batch")
    parser.add_argument("--json-out", default=None, help="write the results here as JSON")
    add_engine_arguments(parser)


def _decode_rate(stats: list) -> tuple[float, float]:
    """(tokens/s over pure-decode steps, their mean batch)."""
    steps = [s for s in stats if s.num_decodes == s.num_seqs and s.num_seqs]
    tokens, secs = sum(s.num_tokens for s in steps), sum(s.duration_s for s in steps)
    return (tokens / secs if secs else 0.0), (tokens / len(steps) if steps else 0.0)


def run(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.structured_output.params import StructuredOutputsParams

    schema = json.load(open(args.schema)) if args.schema else {**DEFAULT_SCHEMA, "minItems": args.min_items}
    llm = LLM(**engine_kwargs(args))
    core = llm.engine.core
    if core.structured is None:
        raise SystemExit("this model has no tokenizer: structured output is unavailable")
    prompts = [f"Write a JSON list of {i % 7 + 2} records about experiment {i}:" for i in range(args.batch)]
    plain = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.output_len, temperature=0.0, structured_outputs={"json": schema})
    warm = prompts[:4]
    llm.generate(warm, [constrained] * len(warm))  # warm-up, and the schema compiled once (as served ones are)
    results = {}
    for name, params in (("unconstrained", plain), ("json_schema", constrained)):
        core.record_step_stats()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        rate, batch = _decode_rate(core.step_stats)
        core.record_step_stats(False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results[name] = {"elapsed_s": elapsed, "output_tokens": tokens, "decode_tokens_per_s": rate,
                         "mean_decode_batch": batch}
        print(f"{name:>14}: {tokens} tokens in {elapsed:.2f} s; pure decode {rate:.1f} tok/s at mean batch "
              f"{batch:.1f}")
    cold = StructuredOutputsParams(json={**schema, "title": f"cold-{uuid.uuid4().hex}"})
    start = time.perf_counter()
    core.structured.backend().compile(cold)
    results["cold_compile_s"] = time.perf_counter() - start
    ratio = results["json_schema"]["decode_tokens_per_s"] / max(results["unconstrained"]["decode_tokens_per_s"], 1e-9)
    results["decode_throughput_ratio"] = ratio
    print(f"constrained / unconstrained pure-decode throughput: {ratio:.3f}; cold schema compile "
          f"{results['cold_compile_s'] * 1000:.1f} ms")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0
