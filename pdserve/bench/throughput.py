"""``pdserve bench throughput``: offline throughput on a fixed set of requests, with an optional HF peer.

Every request ignores EOS so both engines produce exactly the requested number of tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="128", help="N or LO:HI (uniform)")
    parser.add_argument("--output-len", default="64", help="N or LO:HI (uniform)")
    parser.add_argument("--dataset", default=None, help="ShareGPT-format JSON file instead of random prompts")
    parser.add_argument("--bench-seed", type=int, default=0)
    parser.add_argument("--peer", choices=["none", "hf"], default="none",
                        help="also run the same workload through Hugging Face transformers")
    parser.add_argument("--peer-batch-size", type=int, default=0,
                        help="hf peer on CPU: static batches of this size (0: all at once)")
    parser.add_argument("--json-out", default=None, help="write the results here as JSON")
    add_engine_arguments(parser)


def run_pdserve(llm, requests: list[BenchRequest]) -> ThroughputResult:
    from pdserve.engine.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests]
    # Warm up (allocator, kernels, CUDA graphs) on a tiny request so it is not timed.
    llm.generate([requests[0].prompt_token_ids[:8]], SamplingParams(max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in requests], params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return ThroughputResult("pdserve", len(requests), elapsed, sum(len(r.prompt_token_ids) for r in requests),
                            produced)


def run(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM

    llm = LLM(**engine_kwargs(args))
    cfg = llm.config
    vocab = cfg.model.hf_config.vocab_size
    if args.dataset:
        requests = sharegpt_requests(args.dataset, args.num_prompts, llm.get_tokenizer(), cfg.model.max_model_len,
                                     args.bench_seed)
    else:
        requests = random_requests(args.num_prompts, args.input_len, args.output_len, vocab, args.bench_seed)
    results = [run_pdserve(llm, requests)]
    device = str(llm.engine.core.runner.device)
    if args.peer == "hf":
        from pdserve.bench.hf_peer import hf_throughput

        del llm  # free the engine's memory before loading the peer
        results.append(hf_throughput(cfg, requests, args.peer_batch_size))
    print_table(results, device, cfg)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": device, "model": cfg.model.model, "results": [r.as_dict() for r in results]}, f,
                      indent=2)
    return 0


def print_table(results: list[ThroughputResult], device: str, cfg) -> None:
    print(f"model={cfg.model.model} dtype={cfg.model.dtype} device={device} requests={results[0].num_requests} "
          f"input_tokens={results[0].input_tokens} output_tokens={results[0].output_tokens}")
    print(f"{'engine':<10} {'elapsed s':>10} {'req/s':>8} {'in tok/s':>10} {'out tok/s':>10}")
    for r in results:
        print(f"{r.engine:<10} {r.elapsed_s:>10.2f} {r.requests_per_s:>8.2f} {r.input_tokens_per_s:>10.1f} "
              f"{r.output_tokens_per_s:>10.1f}")
    if len(results) > 1:
        print(f"pdserve / {results[1].engine} output tok/s ratio: "
              f"{results[0].output_tokens_per_s / results[1].output_tokens_per_s:.2f}x")
