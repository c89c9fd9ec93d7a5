"""One request's output stream on the front end, and the state the engine client keeps for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.frontend.output_stream import ABORTED, OutputStream

__all__ = ["ABORTED", "RequestState", "RequestStream"]


@dataclass
class RequestState:
    """A request's sequence ids, its output queue, and which sequences have finished."""

    request_id: str  # the server's own id (keys the engine's state)
    seq_ids: list[str]
    stream: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[str] = field(default_factory=set)
    label: str = ""  # the client's id: returned in outputs, never used as a key


class RequestStream(OutputStream):
    """A request's outputs from the async engine; closing it aborts, in the core, what still runs."""

    def __init__(self, client: Any, state: RequestState) -> None:
        super().__init__(state.queue, len(state.seq_ids), state.request_id, state.label)
        self._client = client
        self._state = state

    def _stop(self) -> None:
        self._client._release(self._state)

    def __del__(self) -> None:
        # A stream dropped without being read to the end or closed must not leave its request running. The
        # garbage collector may run this on any thread: hand the clean-up to the engine's event loop.
        loop = self._client._loop
        if self._remaining and loop is not None:
            try:
                loop.call_soon_threadsafe(self.close)
            except RuntimeError:  # the loop is closed: the engine is gone anyway
                pass
