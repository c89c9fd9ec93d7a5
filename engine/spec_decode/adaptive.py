"""Adaptive k: how many tokens to propose for a request this step.

Speculation pays when the target model's step costs about the same for ``k + 1`` query tokens as for one (small
batches, memory-bound decode) and when drafts are accepted. So it backs off:

* by batch: at ``disable_by_batch_size`` running requests or more nothing is proposed (the verify step would
  cost more than it saves), at half that at most ``k // 2`` (at least 1);
* by acceptance: each request keeps an exponential average of its acceptance rate, starting from the engine's
  own average over recent proposals (optimistic, 1, at start-up: a benchmark's first requests teach the later
  ones); below ``min_acceptance`` it stops proposing, except a one-token probe every ``probe_interval``-th step,
  so a request whose text turns repetitive later can win speculation back.

With ``adaptive`` off every eligible request gets ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.spec_decode.config import SpeculativeConfig

EMA_WEIGHT = 0.3  # weight of the newest step: a request's acceptance reacts within a few steps
PRIOR_WEIGHT = 0.05  # the engine-wide average, a new request's starting point, moves more slowly


@dataclass
class _RequestState:
    acceptance: float = 1.0
    steps_off: int = 0  # steps since the last proposal while switched off


class AdaptiveK:
    """Per-request acceptance averages and the batch rule of the module docstring."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.enabled = config.adaptive
        self.min_acceptance = config.min_acceptance
        self.probe_interval = config.probe_interval
        self.disable_by_batch_size = config.disable_by_batch_size
        self._state: dict[str, _RequestState] = {}
        self.prior = 1.0  # the engine-wide acceptance average

    def batch_k(self, num_running: int) -> int:
        """The most tokens any request may propose in a step with ``num_running`` running requests."""
        if not self.enabled:
            return self.k
        if num_running >= self.disable_by_batch_size:
            return 0
        if 2 * num_running >= self.disable_by_batch_size:
            return max(1, self.k // 2)
        return self.k

    def request_k(self, request_id: str, limit: int) -> int:
        """How many tokens this request proposes this step, at most ``limit`` (from :meth:`batch_k`)."""
        if not self.enabled or limit == 0:
            return limit
        state = self._state.get(request_id)
        if state is None:
            state = self._state[request_id] = _RequestState(self.prior)
        if state.acceptance >= self.min_acceptance:
            return limit
        state.steps_off += 1
        if state.steps_off >= self.probe_interval:
            state.steps_off = 0
            return 1
        return 0

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """A verified proposal's outcome."""
        rate = num_accepted / num_drafts
        state = self._state.setdefault(request_id, _RequestState(self.prior))
        state.acceptance = (1 - EMA_WEIGHT) * state.acceptance + EMA_WEIGHT * rate
        self.prior = (1 - PRIOR_WEIGHT) * self.prior + PRIOR_WEIGHT * rate

    def remove(self, request_id: str) -> None:
        self._state.pop(request_id, None)
