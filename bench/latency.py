"""``pdserve bench latency``: decode speed, prefill time and MFU at given batch sizes and prompt lengths, with the
transformers peer (batch 1) or, each engine in a process of its own, vLLM (``--peer vllm``, bench/peer.py).

Decode tokens/s = batch * (output_len - 1) / (time to generate output_len tokens - time to generate 1 token), so
the prefill is not counted in the decode rate. Several ``--input-len`` values (each with its ``--batch-size``) are
measured one after the other on the same engine, e.g. ``--input-len 128,4096,1024 --batch-size 1,1,64``. The
roofline share compares the bytes a decode step reads with the memory copy bandwidth measured in the same run; MFU
compares prefill FLOPs with the measured matmul peak.

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

from pdserve.bench.peer import PEER_HELP, PROCESS_PEERS, add_offline_arguments, refuse_unused_peer_flags
from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs


@dataclass
class LatencyResult:
    engine: str
    prompt_len: int
    output_len: int
    prefill_s: float
    total_s: float
    decode_tokens_per_s: float  # all sequences together
    roofline_share: float | None = None
    prefill_mfu: float | None = None
    batch_size: int = 1


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or a comma list of N, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, not {text!r}")
    return values


_lengths.__name__ = "list of integers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=_lengths, default=[128],
                        help="prompt length, or a comma list: one measurement per length on the same engine")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--peer", choices=["none", "hf", *PROCESS_PEERS], default="none", help=PEER_HELP)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--batch-size", type=_lengths, default=[1],
                        help="sequences prefilled and decoded together: one value, or one per --input-len")
    parser.add_argument("--oracle-acceptance", default="1.0,0.5,0.0",
                        help="acceptances the oracle proposer replays at, comma-separated")
    parser.add_argument("--spec-baseline", choices=["opt-out", "off"], default="opt-out",
                        help="with --speculative-config, the baseline run: requests opting out of speculation, "
                             "or 'off', the engine core with its speculative decoder detached (the path of an "
                             "engine without speculation, in the same process)")
    parser.add_argument("--prompt", default=None,
                        help="with --speculative-config: this text (e.g. a copy-heavy task for the n-gram "
                             "proposer) as every prompt, instead of --input-len random tokens")
    add_engine_arguments(parser)
    add_offline_arguments(parser)


def cases(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(batch size, input length) of each measurement."""
    lens, batches = args.input_len, args.batch_size
    if len(batches) == 1:
        batches = batches * len(lens)
    if len(batches) != len(lens):
        raise SystemExit("--batch-size takes one value or one per --input-len")
    return list(zip(batches, lens))


def case_prompts(cases_: list[tuple[int, int]], vocab: int) -> list[list[list[int]]]:
    """Random token-id prompts of each case, from one seeded generator (the same for every engine)."""
    rng = random.Random(0)
    return [[[rng.randint(100, vocab - 1) for _ in range(n)] for _ in range(b)] for b, n in cases_]


def latency_engine_kwargs(args: argparse.Namespace, cases_: list[tuple[int, int]]) -> dict:
    kw = engine_kwargs(args)
    # A different prompt each iteration would defeat prefix caching; instead the cache is off for this bench, so
    # every iteration really computes the prefill.
    kw["enable_prefix_caching"] = False
    # The prefill is timed as one step: a token budget below the prompts would split it into chunks.
    kw["max_num_batched_tokens"] = max(kw["max_num_batched_tokens"], max(b * n for b, n in cases_))
    return kw


def latency_result(name: str, batch: int, input_len: int, output_len: int, prefill: float, total: float,
                   figures: dict, hf_config) -> LatencyResult:
    """Decode rate, roofline share and prefill MFU of one timing, from the device's measured peaks and the
    model's sizes (``figures``: bench/peer_worker.py's ``device_figures``)."""
    from pdserve.bench import roofline

    # Timing noise can make a short run look faster than its prefill alone: report that as NaN.
    decode_rate = batch * (output_len - 1) / (total - prefill) if total > prefill else float("nan")
    avg_ctx = input_len + output_len // 2
    step_bytes = roofline.decode_step_bytes(figures["weights"], hf_config, figures["kv_elem"], batch * avg_ctx)
    flops = batch * roofline.prefill_flops(figures["per_token_params"], figures["head_params"], hf_config, input_len)
    return LatencyResult(name, input_len, output_len, prefill, total, decode_rate,
                         roofline_share=step_bytes * decode_rate / batch / figures["bandwidth"],
                         prefill_mfu=flops / prefill / figures["matmul_peak"], batch_size=batch)


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


def median_time(fn, iters: int) -> float:
    """The median wall time of ``iters`` calls of ``fn``."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    import torch

    from pdserve.bench.peer_worker import PdserveEngine, time_latency
    from pdserve.engine.llm import LLM

    cases_ = cases(args)
    refuse_unused_peer_flags(args, PROCESS_PEERS)
    if args.peer in PROCESS_PEERS:
        if args.prompt is not None:
            raise SystemExit("--prompt is only supported with --speculative-config")
        from pdserve.bench.latency_peer import run_with_peer

        return run_with_peer(args, cases_, latency_engine_kwargs(args, cases_))
    if args.speculative_config is not None:
        if len(cases_) != 1:
            raise SystemExit("--speculative-config takes one --input-len and one --batch-size")
        args.batch_size, args.input_len = cases_[0]
    elif args.prompt is not None:
        raise SystemExit("--prompt is only supported with --speculative-config")
    elif args.peer == "hf" and any(b != 1 for b, _ in cases_):
        raise SystemExit("the hf peer measures batch size 1 only")
    llm = LLM(**latency_engine_kwargs(args, cases_))
    cfg = llm.config
    if cfg.speculative is not None:
        rng = random.Random(0)
        for _ in range(args.input_len):  # the prompts continue the generator after the one prompt it always drew
            rng.randint(100, cfg.model.hf_config.vocab_size - 1)
        return _run_speculative(args, llm, rng)
    engine = PdserveEngine.wrap(llm)
    prompts = case_prompts(cases_, cfg.model.hf_config.vocab_size)
    timings = [time_latency(engine, p, args.output_len, args.iters) for p in prompts]
    figures = engine.device_figures()
    device = llm.engine.core.runner.device
    results = [latency_result("pdserve", b, n, args.output_len, *t, figures, cfg.model.hf_config)
               for (b, n), t in zip(cases_, timings)]
    if args.peer == "hf":
        del llm, engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results += [latency_result("hf", 1, n, args.output_len, *run_hf(cfg, p[0], args.output_len, args.iters),
                                   figures, cfg.model.hf_config) for (_, n), p in zip(cases_, prompts)]
    print_results(results, f"model={cfg.model.model} device={device}", figures)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": str(device), "bandwidth": figures["bandwidth"], "matmul_peak": figures["matmul_peak"],
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


def print_results(results: list[LatencyResult], header: str, figures: dict) -> None:
    """One row per engine and case, then pdserve's speed over the peer's for each case."""
    print(f"{header} weights={figures['weights'] / 1e9:.2f} GB copy bandwidth={figures['bandwidth'] / 1e12:.2f} "
          f"TB/s matmul peak={figures['matmul_peak'] / 1e12:.1f} TFLOP/s")
    print(f"{'engine':<10} {'batch':>5} {'input':>6} {'prefill ms':>10} {'decode tok/s':>12} {'roofline':>9} "
          f"{'prefill MFU':>11}")
    for r in results:
        print(f"{r.engine:<10} {r.batch_size:>5} {r.prompt_len:>6} {r.prefill_s * 1e3:>10.1f} "
              f"{r.decode_tokens_per_s:>12.1f} {r.roofline_share:>8.1%} {r.prefill_mfu:>10.1%}")
    ours = [r for r in results if r.engine == "pdserve"]
    for peer in [r for r in results if r.engine != "pdserve"]:
        mine = next(r for r in ours if (r.batch_size, r.prompt_len) == (peer.batch_size, peer.prompt_len))
        print(f"pdserve / {peer.engine} at batch {peer.batch_size}, {peer.prompt_len} tokens: prefill "
              f"{peer.prefill_s / mine.prefill_s:.2f}x, decode "
              f"{mine.decode_tokens_per_s / peer.decode_tokens_per_s:.2f}x")


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
    results = run_sweep(llm, prompts, args.output_len, args.iters, acceptances, args.spec_baseline)
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
