"""Proposers: cheap guesses of a request's next tokens, checked afterwards by the target model.

Every proposer answers :meth:`Proposer.propose` for one request at a time with at most ``k`` token ids (fewer or
none when it has no guess). They are deterministic, so their draft distribution is a point mass on each guess,
which is what the rejection sampler assumes when it gets no draft probabilities.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.engine.core.sched_output import ScheduledChunk
from pdserve.engine.request import Request
from pdserve.engine.spec_decode.config import SpeculativeConfig


@dataclass
class ObservedChunk:
    """A chunk of the step just run, for a proposer that reads the target's hidden states: its request (tokens
    already updated with what the step emitted) and the row of the step's hidden states its first token has."""

    request: Request
    chunk: ScheduledChunk
    row: int


class Proposer(ABC):
    """Guesses continuations; one instance serves every request of an engine."""

    # What of the target's hidden states the proposer reads after every step (see ModelRunner.
    # capture_hidden_states): None for proposers that read tokens only.
    hidden_states: str | tuple[int, ...] | None = None

    def observe(self, items: list[ObservedChunk], hidden: Any) -> None:
        """The step just run (only for proposers with ``hidden_states``): ``hidden`` has one row per token of
        the step, in chunk order. Called after the scheduler applied the step and before :meth:`propose_batch`."""

    @abstractmethod
    def propose(self, request: Request, k: int) -> list[int]:
        """Up to ``k`` guesses of the tokens that follow ``request.all_token_ids`` (known tokens only)."""

    def propose_batch(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        """:meth:`propose` for several requests (``ks[i]`` guesses for ``requests[i]``, 0: none); a proposer that
        runs a model batches them."""
        return [self.propose(r, k) if k else [] for r, k in zip(requests, ks)]

    def on_finished(self, request: Request) -> None:
        """A request completed (its outputs are final); stateless proposers ignore it."""

    def forget(self, request_id: str) -> None:
        """A request left the engine (completed or aborted): drop any state kept for it."""


class NgramProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the sequence's last ``n`` tokens (``n`` from
    ``max_n`` down to ``min_n``) and propose the tokens that followed it. Good at copying (code edits,
    summaries quoting their source, retrieval answers); silent when nothing repeats."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, request: Request, k: int) -> list[int]:
        tokens = np.asarray(request.all_token_ids, dtype=np.int64)
        return ngram_lookup(tokens, self.min_n, self.max_n, k)


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The ``k`` tokens after the latest earlier match of the longest suffix n-gram (``min_n <= n <= max_n``)."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        # Windows that start before the suffix itself and leave at least one token after them.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        hits = hits[hits < length - n]
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class OracleProposer(Proposer):
    """Benchmarks only: replays the outputs an earlier run produced for the same prompt, so acceptance can be
    set at will on models whose weights are random (where real proposers accept nothing).

    A proposal of ``k`` tokens keeps its first ``round(acceptance * k)`` tokens correct and makes the rest wrong
    (the recorded token plus one), so greedy verification accepts exactly that share. Outputs come from
    ``oracle_path`` (a JSON list of ``{"prompt_token_ids": [...], "output_token_ids": [...]}``) and from every
    request this engine finished (the longest output per prompt is kept: greedy runs of one prompt only differ
    in length). ``acceptance`` may be changed between runs (the latency benchmark sweeps it on one engine).
    """

    def __init__(self, vocab_size: int, acceptance: float = 1.0, path: str | None = None,
                 forced: bool = False) -> None:
        self.vocab_size = vocab_size
        self.acceptance = acceptance
        # ``oracle_forced`` (see SpeculativeConfig): the verifier accepts ``kept[request_id]`` drafts of the
        # request's latest proposal, whatever the target computed.
        self.forced = forced
        self.kept: dict[str, int] = {}
        self._outputs: dict[tuple[int, ...], list[int]] = {}
        if path is not None:
            with open(path) as f:
                for item in json.load(f):
                    self._outputs[tuple(item["prompt_token_ids"])] = list(item["output_token_ids"])

    def propose(self, request: Request, k: int) -> list[int]:
        recorded = self._outputs.get(tuple(request.prompt_token_ids))
        if recorded is None:
            return []
        pos = request.num_output_tokens
        if not self.forced and recorded[:pos] != request.output_token_ids:
            return []  # this request went its own way (sampling): the record says nothing about it
        drafts = recorded[pos:pos + k]
        num_right = round(self.acceptance * len(drafts))
        self.kept[request.request_id] = num_right
        return drafts[:num_right] + [(t + 1) % self.vocab_size for t in drafts[num_right:]]

    def on_finished(self, request: Request) -> None:
        key = tuple(request.prompt_token_ids)
        if request.num_output_tokens > len(self._outputs.get(key, ())):
            self._outputs[key] = list(request.output_token_ids)

    def forget(self, request_id: str) -> None:
        self.kept.pop(request_id, None)

    def dump(self, path: str) -> None:
        """Write the recorded outputs in the ``oracle_path`` format."""
        with open(path, "w") as f:
            json.dump([{"prompt_token_ids": list(p), "output_token_ids": o} for p, o in self._outputs.items()], f)


def build_proposer(config: SpeculativeConfig, vocab_size: int, runner: Any = None) -> Proposer:
    """The proposer ``config.method`` names (the config already refused unimplemented methods). ``runner``: the
    target's model runner (device, dtype, attention backend, block size), needed by the draft model."""
    if config.method == "draft_model":
        from pdserve.engine.spec_decode.draft_model import DraftModelProposer

        assert config.model is not None
        return DraftModelProposer(
            config.model, load_format=config.draft_load_format, target_vocab_size=vocab_size,
            max_model_len=runner.config.model.max_model_len, device=runner.device, dtype=runner.dtype,
            attention_backend=runner.config.device.attention_backend, block_size=runner.block_size,
            kv_cache_bytes=int(config.draft_kv_cache_gib * (1 << 30)), max_k=config.num_speculative_tokens)
    if config.method in ("eagle", "eagle3"):
        from pdserve.engine.spec_decode.eagle import EagleProposer

        assert config.model is not None
        return EagleProposer(config.model, 1 if config.method == "eagle" else 3, runner,
                             kv_cache_bytes=int(config.draft_kv_cache_gib * (1 << 30)),
                             max_model_len=runner.config.model.max_model_len)
    if config.method == "medusa":
        from pdserve.engine.spec_decode.medusa import MedusaProposer

        assert config.model is not None
        return MedusaProposer(config.model, runner, config.num_speculative_tokens, runner.config.model.max_model_len)
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "oracle":
        return OracleProposer(vocab_size, config.oracle_acceptance, config.oracle_path, config.oracle_forced)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
