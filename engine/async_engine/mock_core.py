"""A model-free engine core: the real scheduler and step loop, with a stand-in for the model and the sampler.

Tests of the async engine and of the servers use it to exercise processes, sockets, streaming, aborts and block
accounting in well under a second, without loading weights (and without torch). The "model" is a pure function
of a sequence's tokens, so outputs are deterministic and batch-independent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.outputs import Logprob


@dataclass
class _Sample:
    token_ids: list[int]
    logprobs: list[list[Logprob] | None] | None


def mock_next_token(token_ids: list[int], vocab_size: int) -> int:
    """The stand-in model: the next token depends only on the sequence so far (never token 0)."""
    return 1 + (token_ids[-1] * 31 + len(token_ids) * 7) % (vocab_size - 1)


class _MockRunner:
    def __init__(self, num_blocks: int, vocab_size: int) -> None:
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.device = "mock"

    def execute_model(self, sched_out: Any) -> Any:
        return sched_out  # the mock sampler reads tokens from the scheduler's requests


class _MockSampler:
    def __init__(self, vocab_size: int, step_delay_s: float) -> None:
        self.vocab_size = vocab_size
        self.step_delay_s = step_delay_s

    def add_request(self, request: Any) -> None:
        pass

    def remove_request(self, request_id: str) -> None:
        pass

    def sample(self, logits: Any, requests: list[Any]) -> _Sample:
        if self.step_delay_s:
            import time

            time.sleep(self.step_delay_s)  # stands in for a model step's latency
        ids = [mock_next_token(r.all_token_ids, self.vocab_size) for r in requests]
        rows = [[Logprob(t, -0.5, 1)] + [Logprob((t + j) % self.vocab_size, -1.0 - j, j + 1)
                                         for j in range(1, (r.sampling_params.logprobs or 0) + 1)]
                if r.sampling_params.logprobs is not None else None for t, r in zip(ids, requests)]
        return _Sample(ids, rows if any(row is not None for row in rows) else None)


class MockEngineCore(EngineCore):
    """An :class:`EngineCore` whose model and sampler are replaced by :func:`mock_next_token`.

    Sizes come from the config (``num_blocks`` defaults to 256); ``vocab_size`` from the model's HF config when
    there is one. ``step_delay_s`` makes each step take at least that long (to test timing and concurrency).
    """

    def __init__(self, config: Any, vocab_size: int | None = None, step_delay_s: float = 0.0) -> None:
        hf = config.model.hf_config
        self.config = config
        self.vocab_size = vocab_size or (getattr(hf, "vocab_size", None) if hf is not None else None) or 1000
        self.max_model_len = config.model.max_model_len
        cache, sched = config.cache, config.scheduler
        num_blocks = cache.num_blocks or 256
        self.runner = _MockRunner(num_blocks, self.vocab_size)
        self.scheduler = Scheduler(
            block_size=cache.block_size, num_blocks=num_blocks, max_num_batched_tokens=sched.max_num_batched_tokens,
            max_num_seqs=sched.max_num_seqs, max_model_len=self.max_model_len,
            enable_prefix_caching=cache.enable_prefix_caching, enable_chunked_prefill=sched.enable_chunked_prefill,
            hash_seed=cache.hash_seed, hash_algo=cache.hash_algo)
        self.sampler = _MockSampler(self.vocab_size, step_delay_s)
        self.num_steps = 0
        self.num_computed_tokens_total = 0


def make_mock_core(config: Any) -> MockEngineCore:
    """Picklable factory for :class:`AsyncLLM`'s ``core_factory`` (no step delay)."""
    return MockEngineCore(config)


def make_slow_mock_core(config: Any) -> MockEngineCore:
    """Picklable factory: each step takes at least 20 ms, like a small model on a CPU."""
    return MockEngineCore(config, step_delay_s=0.02)
