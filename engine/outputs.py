"""Outputs of the engine: per-step deltas from the core and the user-facing results of the offline API."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    decoded: str | None = None


@dataclass
class EngineCoreOutput:
    """What one step produced for one request (token ids only; text is made in the front end)."""

    request_id: str
    new_token_ids: list[int]
    # Per new token: the sampled token's logprob and the top-k alternatives, when logprobs were asked for.
    new_logprobs: list[list[Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0
    # Disaggregation (prefill role): the handle a decode engine loads this request's saved KV by.
    kv_transfer_params: dict | None = None
    # Set when the engine failed while serving this request (it is aborted; the engine serves on): the reason.
    error: str | None = None
    # Of ``num_cached_tokens``: those a KV connector loaded (disaggregation); the rest were prefix-cache hits.
    num_external_cached_tokens: int = 0
    # On a request's first token only: the core's wall-clock marks of its way there (``Request.timing_marks``).
    timing: dict[str, float] | None = None
    # With the first token of a request that asked for prompt_logprobs: one row per prompt token after the first
    # ([its Logprob, then the top-k alternatives]), the first prompt token having none.
    prompt_logprobs: list[list[Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[list[Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None  # see EngineCoreOutput
    # The per-request timeline (engine/frontend/timing.py), on the outputs of servers that keep one.
    timing: dict | None = None
    # When asked for (SamplingParams.prompt_logprobs): one entry per prompt token, None for the first (as vLLM).
    prompt_logprobs: list[list[Logprob] | None] | None = None
