"""Workloads of the offline benchmarks (throughput, latency): random-length token prompts, or prompt/output lengths
from a ShareGPT-format file. The serving benchmark's text workloads are in bench/datasets.py."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdserve.bench.datasets import sharegpt_pairs


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def parse_range(text: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"100:1024"`` -> (100, 1024)."""
    lo, _, hi = str(text).partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if lo_i <= 0 or hi_i < lo_i:
        raise ValueError(f"bad length range {text!r}: expected N or LO:HI with 0 < LO <= HI")
    return lo_i, hi_i


def random_requests(num: int, input_len: str, output_len: str, vocab_size: int, seed: int = 0,
                    low_token_id: int = 100) -> list[BenchRequest]:
    """``num`` prompts of random token ids, lengths uniform in the given ranges."""
    rng = random.Random(seed)
    (ilo, ihi), (olo, ohi) = parse_range(input_len), parse_range(output_len)
    hi_tok = vocab_size - 1
    low = min(low_token_id, hi_tok)
    return [BenchRequest([rng.randint(low, hi_tok) for _ in range(rng.randint(ilo, ihi))], rng.randint(olo, ohi))
            for _ in range(num)]


def sharegpt_requests(path: str, num: int, tokenizer, max_len: int, seed: int = 0) -> list[BenchRequest]:
    """Prompts and output lengths from a ShareGPT JSON file (``[{"conversations": [{"value": ...}, ...]}]``):
    the first turn is the prompt, the second turn's token count is the output length."""
    if tokenizer is None:
        raise ValueError("a ShareGPT dataset needs a model with a tokenizer")
    out: list[BenchRequest] = []
    for first, second in sharegpt_pairs(path, seed):
        prompt = tokenizer(first).input_ids
        completion_len = len(tokenizer(second).input_ids)
        if len(prompt) < 4 or completion_len < 4 or len(prompt) + completion_len > max_len:
            continue
        out.append(BenchRequest(prompt, completion_len))
        if len(out) == num:
            break
    if not out:
        raise ValueError(f"no usable conversations in {path}")
    return out
