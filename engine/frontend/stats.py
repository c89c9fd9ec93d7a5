"""What the async engine reports to its stat loggers (Prometheus in the servers), as plain data.

The engine never imports a metrics library: a logger is any object with ``record(scheduler_stats, iteration)``.
Times are seconds; latencies are measured where the user sees them (the front end), while queue and prefill
times use the moment the core first scheduled the sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from pdserve.engine.core.sched_output import SchedulerStats

logger = logging.getLogger(__name__)


@dataclass
class FinishedSequenceStats:
    """One finished sequence (a request with ``n > 1`` finishes ``n`` of them)."""

    finish_reason: str  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queue_time: float | None = None  # arrival -> first scheduled (None if never scheduled)
    prefill_time: float | None = None  # first scheduled -> first token
    decode_time: float | None = None  # first token -> last token
    mean_time_per_output_token: float | None = None  # decode_time / (tokens - 1), None for a single token
    max_tokens: int = 0  # what the sequence was allowed to generate (0: not known)


@dataclass
class IterationStats:
    """What one message from the core (one engine step) changed, as seen by the front end."""

    timestamp: float
    num_prompt_tokens: int = 0  # prompts whose first token arrived in this step
    # Of those prompts' tokens: found in the prefix cache, and loaded by a KV connector (neither was computed).
    num_prefix_cached_tokens: int = 0
    num_connector_cached_tokens: int = 0
    num_generation_tokens: int = 0
    # max_tokens of the sequences that arrived (what they may generate; the autoscaler sizes decode from it:
    # counted on a prefill pod, it leads the decode pods by the prefill queue)
    num_requested_output_tokens: int = 0
    num_step_tokens: int = 0  # tokens the model computed in the step (prefill chunks + decodes)
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedSequenceStats] = field(default_factory=list)


class StatLogger(Protocol):
    """Receives the core's scheduler snapshot (None when only the front end changed) and one iteration."""

    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None: ...


def record_all(stat_loggers: Iterable[StatLogger], stats: SchedulerStats | None, it: IterationStats) -> None:
    """Hand one iteration to every logger; a logger that fails is logged and skipped (metrics never break
    serving)."""
    for stat_logger in stat_loggers:
        try:
            stat_logger.record(stats, it)
        except Exception:
            logger.exception("stat logger %r failed", stat_logger)


@dataclass
class SequenceTimes:
    """Per-sequence timestamps (``time.time()``) and counters kept by the front end."""

    arrival: float
    num_prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_generation_tokens: int = 0
    max_tokens: int = 0  # the sequence's max_tokens (0: not known)

    def on_tokens(self, now: float, count: int, it: IterationStats, num_cached: int = 0,
                  num_external_cached: int = 0) -> None:
        """Account ``count`` new tokens received at ``now`` into ``it``; with the first, the prompt's tokens and
        how many of them were not computed (``num_cached``, of which ``num_external_cached`` a connector loaded)."""
        if count <= 0:
            return
        if self.first_token is None:
            self.first_token = now
            it.num_prompt_tokens += self.num_prompt_tokens
            it.num_prefix_cached_tokens += max(0, num_cached - num_external_cached)
            it.num_connector_cached_tokens += num_external_cached
            it.time_to_first_tokens.append(now - self.arrival)
        elif self.last_token is not None:
            it.inter_token_latencies.append(now - self.last_token)
        self.last_token = now
        self.num_generation_tokens += count
        it.num_generation_tokens += count

    def finish(self, reason: str, now: float) -> FinishedSequenceStats:
        decode = (self.last_token - self.first_token) if self.first_token is not None else None
        tpot = decode / (self.num_generation_tokens - 1) if decode is not None and self.num_generation_tokens > 1 \
            else None
        return FinishedSequenceStats(
            finish_reason=reason, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens, e2e_latency=now - self.arrival,
            queue_time=(self.scheduled - self.arrival) if self.scheduled is not None else None,
            prefill_time=(self.first_token - self.scheduled)
            if self.first_token is not None and self.scheduled is not None else None,
            decode_time=decode, mean_time_per_output_token=tpot, max_tokens=self.max_tokens)
