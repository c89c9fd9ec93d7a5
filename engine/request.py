"""The engine's per-request state: what the scheduler, the KV cache manager and the sampler read and update."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # lost its blocks; back in the waiting queue, recomputes from scratch
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # blocks allocated, a KV connector is loading them
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context limit
    FINISHED_ABORTED = "abort"  # cancelled by the client or the server

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass
class Request:
    """One sequence inside the engine.

    Token bookkeeping (the scheduler's single invariant)::

        |<------------- prompt ------------->|<--- output --->|
        |<---- num_computed_tokens ---->|
                                        |<-- scheduled this step -->|

    ``num_computed_tokens`` chases ``num_tokens``; chunked prefill, prefix-cache hits and KV loaded from a peer
    all just move it forward. When a step's chunk reaches ``num_tokens`` the step samples one new token.

    With asynchronous scheduling a sampled token whose step is still in flight is *pending*: counted in
    ``num_pending_tokens`` but not yet in ``output_token_ids``. The scheduler may already schedule the next
    decode on it (the runner fills its value on the device), so ``num_computed_tokens`` can reach
    ``num_tokens + num_pending_tokens``; everything that needs token values (prefix-cache hashes, stop checks,
    penalties) only ever sees the known tokens.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    # Extra keys mixed into the first block's hash (e.g. LoRA or multimodal ids); empty for plain text.
    cache_salt: str | None = None

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Sampled in a step whose result the scheduler has not received yet (0 outside asynchronous scheduling,
    # where every step is applied before the next is scheduled).
    num_pending_tokens: int = 0
    # Prompt tokens not computed here when the request was (last) admitted: prefix-cache hits plus, of those,
    # ``num_external_cached_tokens`` loaded by a KV connector.
    num_cached_tokens: int = 0
    num_external_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # Chained hashes of this request's full blocks, extended as tokens are appended.
    block_hashes: list[int] = field(default_factory=list)
    # The stop token id (or stop string) that finished the request; None for EOS, length and aborts.
    stop_reason: int | str | None = None
    # Why the engine itself aborted the request (e.g. it can never fit the KV cache), for logs and errors.
    abort_reason: str | None = None
    # Disaggregation (engine/kv_transfer): the transfer handle whose KV this request loads (decode role), and
    # the handle a finished request's saved KV can be loaded by (prefill role), returned with its output.
    kv_transfer_params: dict | None = None
    kv_transfer_output: dict | None = None
    # Structured output: the request's matcher state (a RequestGrammar from engine/structured_output), or None.
    # The scheduler admits the request only once ``grammar.ready`` (its grammar compiled off the model loop).
    grammar: Any = None
    # Wall-clock marks (``time.time()``) of the request's way to its first token, for the per-request timeline
    # (docs/observability.md): when the scheduler first waited on or started a KV load for it, when that load
    # ended (and how many bytes it moved), when its first chunk was scheduled for compute.
    kv_load_started_at: float | None = None
    kv_load_ended_at: float | None = None
    kv_load_bytes: int = 0
    first_scheduled_at: float | None = None
    # Speculative decoding (engine/spec_decode): guesses of the next tokens, proposed after the request's latest
    # step. The scheduler appends them to its next decode chunk; they become output tokens only once verified.
    spec_token_ids: list[int] = field(default_factory=list)

    def timing_marks(self, first_token_at: float) -> dict[str, float]:
        """The marks above (those that happened) and ``first_token_at``, as sent with the first token."""
        marks = {"first_token": first_token_at}
        if self.first_scheduled_at is not None:
            marks["scheduled"] = self.first_scheduled_at
        if self.kv_load_started_at is not None:
            marks["kv_load_start"] = self.kv_load_started_at
            marks["kv_load_end"] = self.kv_load_ended_at if self.kv_load_ended_at is not None else first_token_at
            marks["kv_load_bytes"] = float(self.kv_load_bytes)
        return marks
    # Prompt logprobs computed so far (engine/prompt_logprobs.py; row j: prompt token j + 1), until sent with the
    # first output; and the token sequences of ``bad_words`` (engine/logits_processors.py), tokenized at admission.
    prompt_logprobs: list | None = None
    bad_words_token_ids: list[list[int]] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def generated_token_ids(self) -> list[int]:
        """The sequence's output so far, including the prompt tokens that were its output elsewhere
        (``SamplingParams.num_generated_prompt_tokens``: a prefill pod's first token, a resumed stream)."""
        n = self.sampling_params.num_generated_prompt_tokens
        return self.prompt_token_ids[len(self.prompt_token_ids) - n:] + self.output_token_ids if n \
            else self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
