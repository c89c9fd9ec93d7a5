"""Speculative decoding in ``pdserve bench latency --speculative-config ...``: decode speed with and without it.

One engine serves every run. The baseline opts out per request (``disable_speculation``), so it is the same
engine, graphs and memory (or, with ``--spec-baseline off``, runs with the engine core's speculative decoder
detached: the code path of an engine without speculation); with the ``oracle`` method the proposer then replays
a reference output at each acceptance of ``--oracle-acceptance`` (benchmark models have random weights, so real
proposers accept nothing).

The oracle's reference: in float32 the baseline's output serves. In bf16 on random weights the top logits are near
ties, and a verify step (``k + 1`` query rows, other matmul shapes) rounds differently from a one-token decode step,
so the argmax flips now and then, the sequences part, and the oracle (which replays only while the request follows
its record) falls silent: at "100 %" most steps would then be plain decode steps. So before the oracle runs a
*calibration* run records the reference in verify-step numerics: every step carries ``k`` deliberately wrong
drafts (adaptive k off), so each output token is row 0 of a verify step of the same shape the timed runs replay,
and a row's result does not depend on the other rows' tokens. The oracle replays that record; its accepted share
is then the one asked for. Every run reports how much of its greedy output equals the baseline's (``greedy =``,
the common prefix averaged over the batch; 100 % in float32) and, for oracle runs, the reference's (``oracle =``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
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
    oracle_match: float | None = None  # the same, of the oracle's reference (oracle runs)
    verify_graph_steps: int | None = None  # verify steps that replayed a CUDA graph in the timed runs


def run_sweep(llm, prompts: list[list[int]], output_len: int, iters: int,
              acceptances: list[float], baseline: str = "opt-out") -> list[SpecResult]:
    """Baseline, then the configured proposer (each oracle acceptance in turn); decode tokens/s counts every
    sequence of the batch: ``batch * (output_len - 1) / (total - prefill)``.

    ``baseline``: ``"opt-out"`` (mode ``baseline``): the requests opt out of speculation; ``"off"`` (mode
    ``off``): the engine core runs with its speculative decoder detached, i.e. the code path of an engine
    without ``--speculative-config`` (same process, weights, KV cache and decode graphs)."""
    from pdserve.engine.sampling_params import SamplingParams

    if baseline not in ("opt-out", "off"):
        raise ValueError(f"baseline must be 'opt-out' or 'off', not {baseline!r}")
    core = llm.engine.core
    spec = core.spec
    outputs: dict[str, list[list[int]]] = {}

    def gen(n: int, opt_out: bool, mode: str) -> None:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, disable_speculation=opt_out)
        detach = mode == "off"
        keep_hidden = getattr(core.runner, "keep_hidden", True)
        if detach:  # a non-speculative engine core: no proposer, no hidden states kept, no verification
            core.spec, core.runner.keep_hidden = None, False
        try:
            out = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            if detach:
                core.spec, core.runner.keep_hidden = spec, keep_hidden
        if n == output_len:
            outputs.setdefault(mode, out)

    graphs = getattr(core.runner, "verify_graph_runner", None)  # None: verify steps run eagerly

    base_mode = "off" if baseline == "off" else "baseline"

    def measure(mode: str, opt_out: bool, reference: str = base_mode) -> SpecResult:
        gen(min(output_len, 16), opt_out, mode)  # warm-up, verify steps included (their first kernel compiles)
        before = dict(spec.stats.to_dict())
        replays = graphs.num_replays if graphs is not None else 0
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
                          greedy_match=_common_prefix_share(outputs[mode], outputs[base_mode]),
                          oracle_match=(_common_prefix_share(outputs[mode], outputs[reference])
                                        if mode != base_mode and spec.config.method == "oracle" else None),
                          verify_graph_steps=graphs.num_replays - replays if graphs is not None else None)

    results = [measure(base_mode, baseline == "opt-out")]
    if spec.config.method == "oracle":
        reference = base_mode
        # At batches where adaptive k proposes nothing there is nothing to replay; a forced oracle (oracle_forced)
        # accepts its share whatever the target computes, so it needs no record in verify-step numerics.
        if spec.adaptive.batch_k(len(prompts)) and not spec.proposer.forced:
            outputs["calibration"] = _calibrate(llm, prompts, output_len)
            reference = "calibration"
        for acceptance in acceptances:
            spec.proposer.acceptance = acceptance
            results.append(measure(f"oracle@{acceptance:g}", False, reference))
    else:
        results.append(measure(spec.config.method, False))
    for r in results:
        r.speedup = r.decode_tokens_per_s / results[0].decode_tokens_per_s
    return results


def _calibrate(llm, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """The calibration run (module docstring): greedy outputs made of verify steps' row-0 tokens, which then
    replace the oracle's records. Returns them."""
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.spec_decode.proposers import OracleProposer

    spec = llm.engine.core.spec
    oracle = spec.proposer
    vocab = oracle.vocab_size
    spec.proposer = _wrong_guesses(vocab)
    adaptive, spec.adaptive.enabled = spec.adaptive.enabled, False
    try:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        spec.proposer, spec.adaptive.enabled = oracle, adaptive
    fd, path = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump([{"prompt_token_ids": p, "output_token_ids": o} for p, o in zip(prompts, outs)], f)
        spec.proposer = OracleProposer(vocab, oracle.acceptance, path, oracle.forced)
    finally:
        os.unlink(path)
    return outs


def _wrong_guesses(vocab_size: int):
    """Calibration's proposer: ``k`` guesses that follow the newest token by 1, 2, ... (wrong but for chance; a
    chance hit is harmless: it is the target's own argmax)."""
    from pdserve.engine.spec_decode.proposers import Proposer

    class WrongGuesses(Proposer):
        def propose(self, request, k: int) -> list[int]:
            return [(request.all_token_ids[-1] + 1 + i) % vocab_size for i in range(k)]

    return WrongGuesses()


def _common_prefix_share(outs: list[list[int]], refs: list[list[int]]) -> float:
    shares = []
    for out, ref in zip(outs, refs):
        n = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        shares.append(n / max(1, len(ref)))
    return statistics.fmean(shares)


def print_results(results: list[SpecResult], batch_size: int, k: int) -> None:
    print(f"speculative decoding: batch {batch_size}, k={k}")
    print(f"{'mode':<12} {'prefill ms':>10} {'decode tok/s':>12} {'speedup':>8} {'accept':>7} {'mean len':>8} "
          f"{'greedy =':>8} {'oracle =':>8} {'graph verify steps':>18}")
    for r in results:
        acc = f"{r.acceptance_rate:.1%}" if r.acceptance_rate is not None else "-"
        length = f"{r.mean_acceptance_length:.2f}" if r.mean_acceptance_length is not None else "-"
        same = f"{r.greedy_match:.1%}" if r.greedy_match is not None else "-"
        same_ref = f"{r.oracle_match:.1%}" if r.oracle_match is not None else "-"
        steps = str(r.verify_graph_steps) if r.verify_graph_steps is not None else "off"
        print(f"{r.mode:<12} {r.prefill_s * 1e3:>10.1f} {r.decode_tokens_per_s:>12.1f} {r.speedup:>7.2f}x "
              f"{acc:>7} {length:>8} {same:>8} {same_ref:>8} {steps:>18}")
