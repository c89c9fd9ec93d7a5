"""A model-free engine core: the real scheduler and step loop, with a stand-in for the model and the sampler.

Tests of the async engine and of the servers use it to exercise processes, sockets, streaming, aborts and block
accounting in well under a second, without loading weights (and without torch). The "model" is a pure function
of a sequence's tokens, so outputs are deterministic and batch-independent.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

from pdserve.engine.engine_core import EngineCore
from pdserve.engine.outputs import Logprob


@dataclass
class _Sample:
    token_ids: list[int]
    logprobs: list[list[Logprob] | None] | None
    errors: dict[int, str] = field(default_factory=dict)  # as SampleResult: the mock never fails a row


def mock_next_token(token_ids: list[int], vocab_size: int) -> int:
    """The stand-in model: the next token depends only on the sequence so far (never token 0)."""
    return 1 + (token_ids[-1] * 31 + len(token_ids) * 7) % (vocab_size - 1)


class _MockRunner:
    """Stands in for ``ModelRunner(config)``: sizes only, and "logits" that are just the scheduler output."""

    def __init__(self, config: Any) -> None:
        hf = config.model.hf_config
        self.vocab_size = (getattr(hf, "vocab_size", None) if hf is not None else None) or 1000
        self.num_blocks = config.cache.num_blocks or 256
        self.device = "mock"
        self.kv_caches: list[Any] = []

    def execute_model(self, sched_out: Any) -> Any:
        return sched_out  # the mock sampler reads tokens from the scheduler's requests

    def attach_kv_connector(self, connector: Any) -> None:
        pass


class _MockSampler:
    """Stands in for ``Sampler(device)``: :func:`mock_next_token` for every row."""

    step_delay_s = 0.0
    vocab_size = 1000  # set from the runner once the core is built

    def __init__(self, device: Any = None) -> None:
        pass

    def add_request(self, request: Any) -> None:
        pass

    def remove_request(self, request_id: str) -> None:
        pass

    def sample(self, logits: Any, requests: list[Any], bitmask: Any = None) -> _Sample:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)  # stands in for a model step's latency
        vocab = self.vocab_size
        ids = [mock_next_token(r.all_token_ids, vocab) for r in requests]
        if bitmask is not None:  # structured output: the mock's token if allowed, else the first allowed one
            from pdserve.engine.structured_output.bitmask import unpack_bitmask

            allowed = unpack_bitmask(bitmask, vocab)
            ids = [t if allowed[i, t] else int(allowed[i].nonzero()[0]) for i, t in enumerate(ids)]
        rows = [[Logprob(t, -0.5, 1)] + [Logprob((t + j) % vocab, -1.0 - j, j + 1)
                                         for j in range(1, (r.sampling_params.logprobs or 0) + 1)]
                if r.sampling_params.logprobs is not None else None for t, r in zip(ids, requests)]
        return _Sample(ids, rows if any(row is not None for row in rows) else None)


@contextlib.contextmanager
def _stub_modules(modules: dict[str, Any]) -> Iterator[None]:
    """Make ``from <name> import X`` inside EngineCore find the stand-ins (without importing torch)."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


class MockEngineCore(EngineCore):
    """The real :class:`EngineCore` (its ``__init__`` and ``step``) with the model runner and the sampler
    replaced, so it follows the engine as the engine changes.

    Sizes come from the config (``num_blocks`` defaults to 256); ``vocab_size`` from the model's HF config when
    there is one, else 1000. ``step_delay_s`` makes each step take at least that long (timing, concurrency).
    """

    def __init__(self, config: Any, step_delay_s: float = 0.0) -> None:
        sampler_cls = type("MockSampler", (_MockSampler,), {"step_delay_s": step_delay_s})
        runner_mod, sampler_mod = types.ModuleType("mock_model_runner"), types.ModuleType("mock_sampler")
        runner_mod.ModelRunner = _MockRunner  # type: ignore[attr-defined]
        sampler_mod.Sampler = sampler_cls  # type: ignore[attr-defined]
        with _stub_modules({"pdserve.engine.worker.model_runner": runner_mod,
                            "pdserve.engine.sampler": sampler_mod}):
            super().__init__(config)
        self.sampler.vocab_size = self.vocab_size


def make_mock_core(config: Any) -> MockEngineCore:
    """Picklable factory for :class:`AsyncLLM`'s ``core_factory`` (no step delay)."""
    return MockEngineCore(config)


def make_slow_mock_core(config: Any) -> MockEngineCore:
    """Picklable factory: each step takes at least 20 ms, like a small model on a CPU."""
    return MockEngineCore(config, step_delay_s=0.02)
