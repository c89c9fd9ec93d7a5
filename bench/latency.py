"""``pdserve bench latency``: batch-1 decode speed, prefill time and MFU, with the transformers peer.

Decode tokens/s = (output_len - 1) / (time to generate output_len tokens - time to generate 1 token), so the
prefill is not counted in the decode rate. The roofline share compares the bytes a decode step reads with the
memory copy bandwidth measured in the same run; MFU compares prefill FLOPs with the measured matmul peak.

With ``--speculative-config`` it measures speculative decoding instead (``pdserve.bench.spec_decode``): the
baseline and the proposer on one engine, at ``--batch-size`` sequences, with the ``oracle`` method at each
acceptance of ``--oracle-acceptance``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs


@dataclass
class LatencyResult:
    engine: str
    prompt_len: int
    output_len: int
    prefill_s: float
    total_s: float
    decode_tokens_per_s: float
    roofline_share: float | None = None
    prefill_mfu: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--peer", choices=["none", "hf"], default="none")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="sequences decoded together (only with --speculative-config)")
    parser.add_argument("--oracle-acceptance", default="1.0,0.5,0.0",
                        help="acceptances the oracle proposer replays at, comma-separated")
    parser.add_argument("--prompt", default=None,
                        help="with --speculative-config: this text (e.g. a copy-heavy task for the n-gram "
                             "proposer) as every prompt, instead of --input-len random tokens")
    add_engine_arguments(parser)


def median_time(fn, iters: int) -> float:
    """The median wall time of ``iters`` calls of ``fn``."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_pdserve(llm, prompt: list[int], output_len: int, iters: int) -> tuple[float, float]:
    from pdserve.engine.sampling_params import SamplingParams

    def gen(n: int) -> None:
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    gen(2)  # warm-up
    # A different prompt each time would defeat prefix caching; instead turn the cache off for this bench
    # (see run()), so every iteration really computes the prefill.
    return median_time(lambda: gen(1), iters), median_time(lambda: gen(output_len), iters)


def run_hf(cfg, prompt: list[int], output_len: int, iters: int) -> tuple[float, float]:
    import torch

    from pdserve.bench.hf_peer import engine_device_dtype, load_hf_model

    device, dtype = engine_device_dtype(cfg)
    model = load_hf_model(cfg, device, dtype)
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    if device.type == "cuda":
        kw["cache_implementation"] = "static"

    def gen(n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()

    gen(2)
    return median_time(lambda: gen(1), iters), median_time(lambda: gen(output_len), iters)


def run(args: argparse.Namespace) -> int:
    import torch

    from pdserve.bench import roofline
    from pdserve.engine.llm import LLM

    kw = engine_kwargs(args)
    kw["enable_prefix_caching"] = False
    # The prefill is timed as one step: a token budget below the prompt would split it into chunks.
    kw["max_num_batched_tokens"] = max(kw["max_num_batched_tokens"], args.input_len * args.batch_size)
    llm = LLM(**kw)
    cfg = llm.config
    runner = llm.engine.core.runner
    rng = random.Random(0)
    prompt = [rng.randint(100, cfg.model.hf_config.vocab_size - 1) for _ in range(args.input_len)]
    if cfg.speculative is not None:
        return _run_speculative(args, llm, rng)
    if args.batch_size != 1 or args.prompt is not None:
        raise SystemExit("--batch-size and --prompt are only supported with --speculative-config")
    device = runner.device
    bandwidth = roofline.measure_copy_bandwidth(device)
    peak = roofline.measure_matmul_flops(device)
    model = runner.model
    weights = roofline.decode_weight_bytes(model)
    per_token_params, head_params = roofline.matmul_params(model)
    kv_elem = runner.kv_spec.dtype.itemsize
    avg_ctx = args.input_len + args.output_len // 2
    step_bytes = roofline.decode_step_bytes(weights, cfg.model.hf_config, kv_elem, avg_ctx)
    flops = roofline.prefill_flops(per_token_params, head_params, cfg.model.hf_config, args.input_len)

    def result(name: str, prefill: float, total: float) -> LatencyResult:
        # Timing noise can make a short run look faster than its prefill alone: report that as NaN.
        decode_rate = (args.output_len - 1) / (total - prefill) if total > prefill else float("nan")
        return LatencyResult(name, args.input_len, args.output_len, prefill, total, decode_rate,
                             roofline_share=step_bytes * decode_rate / bandwidth,
                             prefill_mfu=flops / prefill / peak)

    results = [result("pdserve", *run_pdserve(llm, prompt, args.output_len, args.iters))]
    if args.peer == "hf":
        del llm, model, runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(result("hf", *run_hf(cfg, prompt, args.output_len, args.iters)))
    print(f"model={cfg.model.model} device={device} weights={weights / 1e9:.2f} GB "
          f"copy bandwidth={bandwidth / 1e12:.2f} TB/s matmul peak={peak / 1e12:.1f} TFLOP/s")
    print(f"{'engine':<9} {'prefill ms':>10} {'decode tok/s':>12} {'roofline':>9} {'prefill MFU':>11}")
    for r in results:
        print(f"{r.engine:<9} {r.prefill_s * 1e3:>10.1f} {r.decode_tokens_per_s:>12.1f} "
              f"{r.roofline_share:>8.1%} {r.prefill_mfu:>10.1%}")
    if len(results) > 1:
        print(f"pdserve / hf decode ratio: {results[0].decode_tokens_per_s / results[1].decode_tokens_per_s:.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": str(device), "bandwidth": bandwidth, "matmul_peak": peak,
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


def _run_speculative(args: argparse.Namespace, llm, rng: random.Random) -> int:
    from pdserve.bench.spec_decode import print_results, run_sweep

    vocab = llm.config.model.hf_config.vocab_size
    if args.prompt is not None:
        tokenizer = llm.get_tokenizer()
        if tokenizer is None:
            raise SystemExit("--prompt needs a model with a tokenizer")
        prompts = [tokenizer.encode(args.prompt)] * args.batch_size
    else:
        prompts = [[rng.randint(100, vocab - 1) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    acceptances = [float(a) for a in args.oracle_acceptance.split(",") if a.strip()]
    results = run_sweep(llm, prompts, args.output_len, args.iters, acceptances)
    print(f"model={llm.config.model.model} device={llm.engine.core.runner.device}")
    graphs = getattr(llm.engine.core.runner, "verify_graph_runner", None)
    print("verify CUDA graphs: " + (f"batch {','.join(map(str, graphs.sizes))} x {graphs.q} tokens, "
                                    f"{graphs.pool_bytes / 2**20:.0f} MiB more reserved at capture"
                                    if graphs is not None else "none (verify steps run eagerly)"))
    print_results(results, args.batch_size, llm.config.speculative.num_speculative_tokens)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"batch_size": args.batch_size, "speculative_config": asdict(llm.config.speculative),
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0
