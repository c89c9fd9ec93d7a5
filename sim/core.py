"""The simulated engine core: the real :class:`EngineCore` step loop, scheduler and KV cache manager (paging,
prefix caching, preemption, KV loads), with the model replaced by the cost model's step time.

Only the model runner and the sampler are stand-ins:

- :class:`SimRunner` "runs" a step by letting the cost model's time pass on the clock (sleeping on the wall
  clock in a ``pdserve sim-engine`` process, advancing a virtual clock in ``pdserve sim``);
- :class:`SimSampler` returns deterministic tokens (a function of the sequence so far, never the EOS token, so
  every request runs to its ``max_tokens`` as benchmark traces ask).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.block_hash import seed_id
from pdserve.engine.core.scheduler import Scheduler
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.kv_transfer.block_format import KVDescriptor
from pdserve.engine.outputs import Logprob
from pdserve.sim.clock import Clock
from pdserve.sim.cost_model import CostProfile, load_profile
from pdserve.sim.kv import KVFaults, SimKVScheduler, SimKVState, SimKVWorker


def sim_next_token(last_token: int, num_tokens: int, vocab_size: int, eos_token_id: int | None) -> int:
    """The stand-in model: the next token of a sequence of ``num_tokens`` tokens ending in ``last_token``
    (a function of the sequence so far); never 0, never EOS."""
    token = 1 + (last_token * 31 + num_tokens * 7) % (vocab_size - 1)
    if token == eos_token_id:
        token = 1 if eos_token_id != 1 else 2
    return token


@dataclass
class _Sample:
    token_ids: list[int]
    logprobs: list[list[Logprob] | None] | None
    errors: dict[int, str] = field(default_factory=dict)  # as the real sampler's: rows that failed (none here)


class SimRunner:
    """Stands in for the model runner: a step costs ``profile.step_time_s`` on ``clock``."""

    def __init__(self, profile: CostProfile, clock: Clock, vocab_size: int, num_blocks: int) -> None:
        self.profile, self.clock = profile, clock
        self.vocab_size, self.num_blocks = vocab_size, num_blocks
        self.device = "sim"
        self.kv_caches: list[Any] = []
        self.last_step_s = 0.0
        self.busy_s = 0.0  # total modelled step time (utilization)

    def execute_model(self, sched_out: Any) -> Any:
        chunks = sched_out.chunks
        cost = self.profile.step_time_s(sum(c.num_tokens for c in chunks), sum(c.context_len for c in chunks),
                                        has_prefill=any(c.num_tokens > 1 for c in chunks))
        self.last_step_s = cost
        self.busy_s += cost
        self.clock.spend(cost)
        return sched_out  # the sampler reads the tokens from the requests


class SimSampler:
    """Stands in for the sampler: :func:`sim_next_token` for every row, logprobs when asked."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def add_request(self, request: Any) -> None:
        pass

    def remove_request(self, request_id: str) -> None:
        pass

    def sample(self, logits: Any, requests: list[Any], bitmask: Any = None) -> _Sample:
        vocab = self.vocab_size
        ids = [sim_next_token(r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1],
                              r.num_tokens, vocab, r.eos_token_id) for r in requests]
        rows = [[Logprob(t, -0.5, 1)] + [Logprob((t + j) % vocab, -1.0 - j, j + 1)
                                         for j in range(1, (r.sampling_params.logprobs or 0) + 1)]
                if r.sampling_params.logprobs is not None else None for t, r in zip(ids, requests)]
        return _Sample(ids, rows if any(row is not None for row in rows) else None)


class SimEngineCore(EngineCore):
    """An :class:`EngineCore` whose steps take the time of ``profile`` on ``clock``.

    The KV pool holds ``config.cache.num_blocks`` blocks, or as many as the profile's GPU holds. With
    ``config.kv_transfer.role`` ``prefill`` or ``decode`` it runs the simulated KV connector (:mod:`.kv`) with
    ``faults``; ``pod`` names it in the handles it returns. Steps are synchronous (no step in flight), as the
    engine runs them with a KV connector.
    """

    def __init__(self, config: EngineConfig, profile: CostProfile, *, clock: Clock | None = None,
                 faults: KVFaults | None = None, pod: str = "sim-0", load_failure_policy: str = "recompute") -> None:
        # EngineCore.__init__ builds a real model runner and sampler; the parts the step loop reads are built
        # here instead (a test steps this core through EngineCore.step, so drift in the loop shows).
        connector = config.kv_transfer.connector
        if connector not in (None, "", "sim"):
            raise ValueError(f"the simulated engine moves KV with the 'sim' connector, not {connector!r}")
        self.config = config
        self.profile = profile
        self.clock = clock or Clock()
        cache, sched = config.cache, config.scheduler
        hf = config.model.hf_config
        vocab = (getattr(hf, "vocab_size", None) if hf is not None else None) or 32000
        num_blocks = cache.num_blocks or (profile.num_blocks * profile.block_size) // cache.block_size
        self.runner = SimRunner(profile, self.clock, vocab, num_blocks)
        self.vocab_size = vocab
        self.max_model_len = config.model.max_model_len
        role = config.kv_transfer.role
        self.kv_state = SimKVState(self.clock, faults or KVFaults(), profile.kv_bytes)
        kv_scheduler_half = None
        self.kv_connector = None
        if role != "both" or connector == "sim":
            kv_scheduler_half = SimKVScheduler(self.kv_state, role, pod, _descriptor(config, profile),
                                               load_failure_policy)
            self.kv_connector = SimKVWorker(self.kv_state)
        self.async_scheduling = False
        self._in_flight = None
        self._last_done = 0.0
        self._step_trace = None  # PDSERVE_STEP_TRACE is the real engine's: a simulated step's time is the model's
        self._failed_outputs: list = []  # requests aborted by a failure, not yet reported (the engine's)
        self._host_token_ids: set[str] = set()
        self.scheduler = Scheduler(
            block_size=cache.block_size, num_blocks=num_blocks,
            max_num_batched_tokens=sched.max_num_batched_tokens, max_num_seqs=sched.max_num_seqs,
            max_model_len=self.max_model_len, enable_prefix_caching=cache.enable_prefix_caching,
            enable_chunked_prefill=sched.enable_chunked_prefill, hash_seed=cache.hash_seed,
            hash_algo=cache.hash_algo, enable_kv_events=cache.kv_events_endpoint is not None,
            kv_connector=kv_scheduler_half, async_scheduling=False)
        self.sampler = SimSampler(vocab)
        # No grammars: a simulated step samples no logits, so a constraint could not be honoured (refused instead).
        self.structured = None
        if config.speculative is not None:  # no logits to verify drafts against either
            raise ValueError("the simulated engine cannot speculate: --speculative-config is refused")
        self.spec = None
        self.num_steps = 0
        self.num_computed_tokens_total = 0
        self.step_stats = None

    def _poll_kv_transfers(self, idle: bool) -> None:
        """As the engine's, but an idle wait lets time pass on this core's clock (virtual or wall)."""
        if self.kv_connector is None:
            return
        out = self.kv_connector.get_finished()
        self.scheduler.update_from_kv_transfer(out)
        if idle and out.is_empty:
            ready = self.kv_state.next_ready_at()
            wait = 0.002 if ready is None else max(0.0, ready - self.clock.now())
            self.clock.spend(min(wait, 0.02))


def _descriptor(config: EngineConfig, profile: CostProfile) -> KVDescriptor:
    """The descriptor the simulated KV claims: the model's shapes as the HF config gives them."""
    hf = config.model.hf_config
    heads = getattr(hf, "num_attention_heads", 1) or 1
    return KVDescriptor(model_fingerprint=f"sim:{profile.name}", dtype="bfloat16",
                        block_size=config.cache.block_size, num_layers=getattr(hf, "num_hidden_layers", 1) or 1,
                        num_kv_heads=getattr(hf, "num_key_value_heads", heads) or heads,
                        head_dim=getattr(hf, "head_dim", None) or (getattr(hf, "hidden_size", heads) // heads),
                        hash_algo=config.cache.hash_algo, hash_seed_id=seed_id(config.cache.hash_seed))


def make_sim_core(config: EngineConfig, profile: str, faults: KVFaults | None = None,
                  load_failure_policy: str = "recompute") -> SimEngineCore:
    """Picklable factory (with :func:`functools.partial`) for :class:`AsyncLLM`'s ``core_factory``; the pod gets
    a random name for its KV handles."""
    return SimEngineCore(config, load_profile(profile), faults=faults, pod=f"sim-{uuid.uuid4().hex[:12]}",
                         load_failure_policy=load_failure_policy)
