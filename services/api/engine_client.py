"""What the API layer needs from an engine: the interface that ``AsyncLLM`` (and any router client) provides."""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from pdserve.engine.core.sched_output import SchedulerStats
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams


class OutputStream(Protocol):
    """One request's outputs. ``close()`` aborts whatever of the request still runs (idempotent)."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    """An engine (local or remote) that the HTTP and gRPC front ends can serve."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # a Hugging Face tokenizer, or None for a model without one

    @property
    def is_ready(self) -> bool:
        """True when requests can be served (drives ``/health`` and gRPC health)."""

    @property
    def dead_error(self) -> BaseException | None:
        """Set once the engine can never serve again."""

    def get_stats(self) -> SchedulerStats | None:
        """The latest scheduler snapshot, for metrics (None when unknown)."""

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; ``ValueError`` for bad input."""

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, *,
                 stream: bool = True, prompt_text: str | None = None,
                 kv_transfer_params: dict | None = None) -> OutputStream:
        """Validate and queue a request, raising at once for bad input (see ``AsyncLLM.generate``).

        ``kv_transfer_params``: a prefill pod's transfer handle whose KV this (decode-role) engine loads."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its resources."""
