"""Speculative decoding in ``pdserve bench latency --speculative-config ...``: decode speed with and without it.

One engine serves every run. The baseline opts out per request (``disable_speculation``), so it is the same
engine, graphs and memory; with the ``oracle`` method the baseline's outputs are recorded by the proposer and
replayed as drafts at each acceptance of ``--oracle-acceptance`` (benchmark models have random weights, so real
proposers accept nothing). Every run reports how much of its greedy output equals the baseline's (the common
prefix, averaged over the batch): 100 % in float32; in bf16 on random weights the top logits are near ties, so
a verify step (several query tokens, eager) and a decode step (one token, CUDA graph) can round differently and
pick another token, after which the sequences part.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from pdserve.bench.latency import median_time


@dataclass
class SpecResult:
    mode: str  # "baseline" | "ngram" | "oracle@0.5" ...
    prefill_s: float
    total_s: float
    decode_tokens_per_s: float
    acceptance_rate: float | None = None  # accepted / draft tokens in the timed runs
    mean_acceptance_length: float | None = None  # 1 + accepted / proposals
    speedup: float | None = None
    greedy_match: float | None = None  # mean common-prefix share of the baseline's outputs


def run_sweep(llm, prompts: list[list[int]], output_len: int, iters: int,
              acceptances: list[float]) -> list[SpecResult]:
    """Baseline, then the configured proposer (each oracle acceptance in turn); decode tokens/s counts every
    sequence of the batch: ``batch * (output_len - 1) / (total - prefill)``."""
    from pdserve.engine.sampling_params import SamplingParams

    core = llm.engine.core
    spec = core.spec
    outputs: dict[str, list[list[int]]] = {}

    def gen(n: int, opt_out: bool, mode: str) -> None:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, disable_speculation=opt_out)
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if n == output_len:
            outputs.setdefault(mode, out)

    def measure(mode: str, opt_out: bool) -> SpecResult:
        gen(min(output_len, 16), opt_out, mode)  # warm-up, verify steps included (their first kernel compiles)
        before = dict(spec.stats.to_dict())
        prefill = median_time(lambda: gen(1, opt_out, mode), iters)
        total = median_time(lambda: gen(output_len, opt_out, mode), iters)
        after = spec.stats.to_dict()
        drafts = after["num_drafts"] - before["num_drafts"]
        draft_tokens = after["num_draft_tokens"] - before["num_draft_tokens"]
        accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
        rate = len(prompts) * (output_len - 1) / (total - prefill) if total > prefill else float("nan")
        return SpecResult(mode, prefill, total, rate,
                          accepted / draft_tokens if draft_tokens else None,
                          1 + accepted / drafts if drafts else None,
                          greedy_match=_common_prefix_share(outputs[mode], outputs["baseline"]))

    results = [measure("baseline", True)]
    if spec.config.method == "oracle":
        for acceptance in acceptances:
            spec.proposer.acceptance = acceptance
            results.append(measure(f"oracle@{acceptance:g}", False))
    else:
        results.append(measure(spec.config.method, False))
    for r in results:
        r.speedup = r.decode_tokens_per_s / results[0].decode_tokens_per_s
    return results


def _common_prefix_share(outs: list[list[int]], refs: list[list[int]]) -> float:
    shares = []
    for out, ref in zip(outs, refs):
        n = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        shares.append(n / max(1, len(ref)))
    return statistics.fmean(shares)


def print_results(results: list[SpecResult], batch_size: int, k: int) -> None:
    print(f"speculative decoding: batch {batch_size}, k={k}")
    print(f"{'mode':<12} {'prefill ms':>10} {'decode tok/s':>12} {'speedup':>8} {'accept':>7} {'mean len':>8} "
          f"{'greedy =':>8}")
    for r in results:
        acc = f"{r.acceptance_rate:.1%}" if r.acceptance_rate is not None else "-"
        length = f"{r.mean_acceptance_length:.2f}" if r.mean_acceptance_length is not None else "-"
        same = f"{r.greedy_match:.1%}" if r.greedy_match is not None else "-"
        print(f"{r.mode:<12} {r.prefill_s * 1e3:>10.1f} {r.decode_tokens_per_s:>12.1f} {r.speedup:>7.2f}x "
              f"{acc:>7} {length:>8} {same:>8}")
