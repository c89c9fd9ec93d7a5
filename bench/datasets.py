"""Workloads for the serving benchmark: random lengths, a ShareGPT-format file, multi-tenant shared prefixes, and
long prompts mixed with chat-like requests.

Prompts are text (so any OpenAI-compatible server can take them) built from a fixed list of common English words,
which most tokenizers turn into about one token per word; the benchmark reports the exact token counts from the
server's ``usage``. Everything is seeded, so two runs send the same requests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not "
    "but first one their its new after who they have two been more other all time year would city during up she "
    "when most also about into can some many only over world state team three game united known well people school "
    "later under made war music river country house work film may such these while part high between where before "
    "used team since home number four both then five through second several war life being most early great place "
    "however north south east west club season long age area play water small local name group public former family "
    "built line based series album children history following around center street county national church final "
    "market light story stone bridge garden winter summer forest mountain village island ocean letter machine paper"
).split()


@dataclass
class BenchRequest:
    """One request of a workload. ``system`` is a tenant's shared system prompt (shared-prefix workload)."""

    prompt: str
    expected_output_len: int
    system: str | None = None
    tenant: str | None = None

    def completion_prompt(self) -> str:
        """The prompt for ``/v1/completions`` (system prompt first, so tenants share a token prefix)."""
        if self.system is None:
            return self.prompt
        return f"{self.system}\n\nQuestion: {self.prompt}\nAnswer:"

    def chat_messages(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        return messages + [{"role": "user", "content": self.prompt}]


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))


def _around(rng: random.Random, mean: int, range_ratio: float) -> int:
    lo, hi = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
    return max(1, rng.randint(max(1, lo), max(1, hi)))


def random_dataset(num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list[BenchRequest]:
    """``num`` prompts of about ``input_len`` tokens asking for about ``output_len`` tokens (± range_ratio)."""
    if not 0 <= range_ratio < 1:
        raise ValueError("random range ratio must be in [0, 1)")
    rng = random.Random(seed)
    return [BenchRequest(random_words(rng, _around(rng, input_len, range_ratio)),
                         _around(rng, output_len, range_ratio)) for _ in range(num)]


def mixed_dataset(num: int, long_fraction: float, long_input_len: int, long_output_len: int, chat_input_len: int,
                  chat_output_len: int, range_ratio: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    """Long prompts with short outputs (summaries, retrieval) mixed with chat-like requests: each request is a long
    one with probability ``long_fraction``; lengths vary by ± ``range_ratio`` around their means."""
    if not 0 <= long_fraction <= 1:
        raise ValueError("the share of long requests must be in [0, 1]")
    if not 0 <= range_ratio < 1:
        raise ValueError("random range ratio must be in [0, 1)")
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        inp, outp = (long_input_len, long_output_len) if rng.random() < long_fraction else (chat_input_len,
                                                                                             chat_output_len)
        out.append(BenchRequest(random_words(rng, _around(rng, inp, range_ratio)), _around(rng, outp, range_ratio)))
    return out


def sharegpt_pairs(path: str, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(first turn, second turn) of each conversation in a ShareGPT-format JSON file (a list of records with
    ``conversations: [{"from": "human"|"gpt", "value": ...}, ...]``), in an order shuffled by ``seed``; records
    of another shape are skipped. The offline benchmarks (bench/workload.py) read the same files."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    random.Random(seed).shuffle(records)
    for rec in records:
        if not isinstance(rec, dict):
            continue
        turns = rec.get("conversations") or rec.get("conversation") or []
        if len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            continue
        yield str(turns[0].get("value", "")), str(turns[1].get("value", ""))


def sharegpt_dataset(path: str, num: int, seed: int = 0, output_len: int | None = None,
                     max_prompt_words: int = 1024) -> list[BenchRequest]:
    """First human turn and the answer's length from a ShareGPT-format JSON file (see :func:`sharegpt_pairs`).
    Output lengths are estimated from the answer (1.3 tokens per word) unless ``output_len`` fixes them."""
    out: list[BenchRequest] = []
    for prompt, answer in sharegpt_pairs(path, seed):
        words = len(prompt.split())
        if not prompt.strip() or words > max_prompt_words:
            continue
        expected = output_len or max(4, min(2048, round(len(answer.split()) * 1.3)))
        out.append(BenchRequest(prompt, expected))
        if len(out) == num:
            break
    if not out:
        raise ValueError(f"{path}: no usable conversations")
    while len(out) < num:  # a small file is reused
        out.append(out[len(out) % max(1, len(out))])
    return out


def shared_prefix_dataset(num: int, num_tenants: int, system_len: int, question_len: int, output_len: int,
                          seed: int = 0) -> list[BenchRequest]:
    """Multi-tenant workload: each tenant has one long system prompt; its requests add a short question.

    A prefix cache (and prefix-aware routing) should serve most prompt tokens from cache: the share is about
    ``system_len / (system_len + question_len)`` once every tenant has been seen.
    """
    if num_tenants < 1:
        raise ValueError("the shared-prefix workload needs at least one tenant")
    rng = random.Random(seed)
    systems = [f"You are the assistant of tenant {t}. " + random_words(rng, system_len) for t in range(num_tenants)]
    out = []
    for _ in range(num):
        t = rng.randrange(num_tenants)
        out.append(BenchRequest(random_words(rng, question_len) + "?", output_len, system=systems[t],
                                tenant=f"tenant-{t}"))
    return out
