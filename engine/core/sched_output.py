"""What the scheduler hands to the model runner each step, and what comes back. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A chunk's input token whose value is still on the device (sampled by the step in flight, asynchronous
# scheduling only): the runner fills it from that step's sampled tokens before the forward pass.
PLACEHOLDER_TOKEN_ID = -1


@dataclass(frozen=True)
class ScheduledChunk:
    """One request's slice of a step.

    ``token_ids`` are the tokens whose KV is computed this step, at positions ``start_pos ..
    start_pos + len(token_ids) - 1``; ``block_ids`` is the request's whole block table (covering at least
    ``start_pos + len(token_ids)`` slots). When ``sample`` is set the chunk reaches the end of the request's known
    tokens and the runner returns a logits row for its last position. With asynchronous scheduling the last
    token of a decode chunk may be :data:`PLACEHOLDER_TOKEN_ID`: the token the previous step is still sampling.

    Speculative decoding: the last ``num_draft_tokens`` of ``token_ids`` are a proposer's guesses (the chunk is a
    decode plus its drafts, ``sample`` set); the runner returns ``num_draft_tokens + 1`` logits rows for it, the
    chunk's last positions in order, and the verified outcome may roll ``num_computed_tokens`` back.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    num_draft_tokens: int = 0

    @property
    def num_logits_rows(self) -> int:
        """Logits rows the runner returns for this chunk."""
        return self.num_draft_tokens + 1 if self.sample else 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens the attention of this chunk's last position sees (cached prefix + this chunk)."""
        return self.start_pos + len(self.token_ids)


@dataclass
class SchedulerOutput:
    """A step: decode chunks first, then prefill chunks, all in one flattened batch."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests that left the running set since the last step (finished, aborted or preempted): a runner that
    # keeps per-request state drops it.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)
    # What the KV connector's worker half loads and saves this step (engine/kv_transfer), when one is set.
    kv_connector_metadata: Any = None
    # Numbers the scheduler's steps (from 1) so that an update finds the requests this step sampled for.
    step_id: int = 0
    # Prompt logprobs to compute this step (request id -> engine.prompt_logprobs.PromptLogprobsTask), planned by
    # the engine core after scheduling; empty for steps without requests that asked.
    prompt_logprobs: dict[str, Any] = field(default_factory=dict)

    @property
    def total_num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics and load reports."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use, in [0, 1]
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int  # of which found (cumulative)
    num_preemptions: int  # cumulative
    kv_capacity_tokens: int = 0  # tokens the KV pool holds (blocks x block size)
    kv_transfer: dict[str, Any] | None = None  # the KV connector's counters (KVTransferStats.to_dict()), if any
    # Structured output's counters (StructuredOutputStats.to_dict()), on engines that can constrain outputs.
    structured_output: dict[str, Any] | None = None
    # Speculative decoding's counters (SpecDecodingStats.to_dict()), on engines that speculate.
    spec_decode: dict[str, Any] | None = None
