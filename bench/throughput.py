"""``pdserve bench throughput``: offline throughput on a fixed set of requests, with an optional HF peer.

Every request ignores EOS so both engines produce exactly the requested number of tokens.

It also reports the **decode roofline share** of the run: over the pure-decode steps, the bytes those steps
must read (all weights once per step, plus the K and V of every live context token) divided by their total
time and by the device's copy bandwidth, measured in the same process right after the run. Steps that carry
prefill chunks are left out (they are compute-bound); their share of the time is printed beside it.

``--peer vllm`` runs the same requests through vLLM, pdserve and vLLM each in a process of their own
(bench/peer.py); ``--peer pdserve`` is that path's self-check.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

from pdserve.bench.peer import PEER_HELP, PROCESS_PEERS, add_offline_arguments, refuse_unused_peer_flags
from pdserve.bench.step_profile import (StepWindowProfiler, format_breakdown, parse_window,
                                        step_breakdown)
from pdserve.bench.workload import BenchRequest, random_requests, sharegpt_requests
from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs


@dataclass
class ThroughputResult:
    engine: str
    num_requests: int
    elapsed_s: float
    input_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def input_tokens_per_s(self) -> float:
        return self.input_tokens / self.elapsed_s

    def as_dict(self) -> dict:
        return {**asdict(self), "requests_per_s": self.requests_per_s,
                "input_tokens_per_s": self.input_tokens_per_s, "output_tokens_per_s": self.output_tokens_per_s}


@dataclass
class DecodeRoofline:
    """How close the pure-decode steps of a run came to the memory roofline."""

    bandwidth: float  # measured copy bandwidth, bytes/s (read + write)
    decode_steps: int
    decode_time_s: float
    total_steps: int
    total_time_s: float  # all steps, as the engine core timed them
    decode_bytes: float  # bytes the decode steps had to read, summed
    mean_decode_batch: float

    @property
    def share(self) -> float:
        return self.decode_bytes / max(self.decode_time_s, 1e-12) / self.bandwidth

    def as_dict(self) -> dict:
        return {**asdict(self), "share": self.share}


def decode_roofline(stats: list, weights: int, kv_bytes_per_token: int, bandwidth: float) -> DecodeRoofline:
    """Aggregate the engine core's :class:`~pdserve.engine.engine_core.StepStat` records."""
    decode = [s for s in stats if s.num_seqs and s.num_decodes == s.num_seqs]
    return DecodeRoofline(
        bandwidth=bandwidth, decode_steps=len(decode), decode_time_s=sum(s.duration_s for s in decode),
        total_steps=len(stats), total_time_s=sum(s.duration_s for s in stats),
        decode_bytes=float(sum(weights + kv_bytes_per_token * s.total_context for s in decode)),
        mean_decode_batch=sum(s.num_seqs for s in decode) / max(1, len(decode)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="128", help="N or LO:HI (uniform)")
    parser.add_argument("--output-len", default="64", help="N or LO:HI (uniform)")
    parser.add_argument("--dataset", default=None, help="ShareGPT-format JSON file instead of random prompts")
    parser.add_argument("--bench-seed", type=int, default=0)
    parser.add_argument("--peer", choices=["none", "hf", *PROCESS_PEERS], default="none", help=PEER_HELP)
    parser.add_argument("--peer-batch-size", type=int, default=0,
                        help="hf peer on CPU: static batches of this size (0: all at once)")
    parser.add_argument("--json-out", default=None, help="write the results here as JSON")
    parser.add_argument("--step-breakdown", action="store_true",
                        help="print the timed run's steps by kind: pure decode, mixed steps a CUDA graph holds, "
                             "eager mixed steps (bench/step_profile.py)")
    parser.add_argument("--profile-steps", default=None, metavar="A:B",
                        help="record steps A..B-1 of the timed run with torch.profiler and print their GPU kernel "
                             "time by category against the wall time (implies --step-breakdown)")
    add_engine_arguments(parser)
    add_offline_arguments(parser)


def run_pdserve(llm, requests: list[BenchRequest], profiler=None) -> tuple[ThroughputResult, list]:
    """Time the workload; returns the result and the engine core's per-step records of the timed run.
    ``profiler``: a :class:`~pdserve.bench.step_profile.StepWindowProfiler` armed for the timed run only."""
    from pdserve.engine.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests]
    # Warm up (allocator, kernels for prefill shapes) on a few requests so it is not timed.
    llm.generate([r.prompt_token_ids for r in requests[:4]], SamplingParams(max_tokens=4, ignore_eos=True))
    core = llm.engine.core
    core.record_step_stats()
    if profiler is not None:
        profiler.arm()
    start = time.perf_counter()
    try:
        outs = llm.generate([r.prompt_token_ids for r in requests], params)
    finally:
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disarm()
    stats = core.step_stats
    core.record_step_stats(False)
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    result = ThroughputResult("pdserve", len(requests), elapsed, sum(len(r.prompt_token_ids) for r in requests),
                              produced)
    return result, stats


def measure_roofline(llm, stats: list) -> DecodeRoofline:
    from pdserve.bench import roofline

    runner = llm.engine.core.runner
    bandwidth = roofline.measure_copy_bandwidth(runner.device)
    kv_per_token = roofline.kv_bytes_per_token(llm.config.model.hf_config, runner.kv_spec.dtype.itemsize)
    return decode_roofline(stats, roofline.decode_weight_bytes(runner.model), kv_per_token, bandwidth)


def run(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM

    refuse_unused_peer_flags(args, PROCESS_PEERS)
    try:
        window = parse_window(args.profile_steps)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.peer in PROCESS_PEERS and (window or args.step_breakdown):
        raise SystemExit("--step-breakdown and --profile-steps profile pdserve alone: run them without --peer")
    if args.peer in PROCESS_PEERS:
        from pdserve.bench.throughput_peer import run_with_peer

        return run_with_peer(args)
    llm = LLM(**engine_kwargs(args))
    cfg = llm.config
    vocab = cfg.model.hf_config.vocab_size
    if args.dataset:
        requests = sharegpt_requests(args.dataset, args.num_prompts, llm.get_tokenizer(), cfg.model.max_model_len,
                                     args.bench_seed)
    else:
        requests = random_requests(args.num_prompts, args.input_len, args.output_len, vocab, args.bench_seed)
    profiler = StepWindowProfiler(llm.engine.core, window) if window else None
    result, stats = run_pdserve(llm, requests, profiler)
    results = [result]
    device = llm.engine.core.runner.device
    device_name = torch_device_name(device)
    roof = measure_roofline(llm, stats)
    if args.peer == "hf":
        from pdserve.bench.hf_peer import hf_throughput

        del llm  # free the engine's memory before loading the peer
        free_device_memory(device)
        results.append(hf_throughput(cfg, requests, args.peer_batch_size))
    print_table(results, device_name, cfg.model.model, cfg.model.dtype)
    print_roofline(roof)
    if args.step_breakdown or profiler is not None:
        print_step_profile(llm, stats, result.elapsed_s, profiler)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": device_name, "model": cfg.model.model, "results": [r.as_dict() for r in results],
                       "decode_roofline": roof.as_dict()}, f, indent=2)
    return 0


def print_step_profile(llm, stats: list, wall_s: float, profiler) -> None:
    mixed = getattr(llm.engine.core.runner, "mixed_graph_runner", None)
    top = mixed.max_size if mixed is not None else 0
    print(f"steps by kind (mixed-step graphs up to {top} tokens; {wall_s:.2f} s of wall time):")
    print(format_breakdown(step_breakdown(stats, top), wall_s))
    if profiler is not None:
        print(profiler.result.format() if profiler.result else "the run ended before --profile-steps' window")


def torch_device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def free_device_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_roofline(r: DecodeRoofline) -> None:
    print(f"decode roofline: {r.share:.1%} of copy bandwidth {r.bandwidth / 1e12:.2f} TB/s over {r.decode_steps} "
          f"pure-decode steps (mean batch {r.mean_decode_batch:.1f}, {r.decode_time_s:.2f}s = "
          f"{r.decode_time_s / max(r.total_time_s, 1e-12):.0%} of step time; {r.total_steps} steps in all)")


def print_table(results: list[ThroughputResult], device: str, model: str, dtype: str) -> None:
    print(f"model={model} dtype={dtype} device={device} requests={results[0].num_requests} "
          f"input_tokens={results[0].input_tokens} output_tokens={results[0].output_tokens}")
    print(f"{'engine':<10} {'elapsed s':>10} {'req/s':>8} {'in tok/s':>10} {'out tok/s':>10}")
    for r in results:
        print(f"{r.engine:<10} {r.elapsed_s:>10.2f} {r.requests_per_s:>8.2f} {r.input_tokens_per_s:>10.1f} "
              f"{r.output_tokens_per_s:>10.1f}")
    if len(results) > 1:
        print(f"pdserve / {results[1].engine} output tok/s ratio: "
              f"{results[0].output_tokens_per_s / results[1].output_tokens_per_s:.2f}x")
