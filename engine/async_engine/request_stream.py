"""One request's output stream on the front end, and the state the engine client keeps for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.outputs import RequestOutput

ABORTED = object()  # queued to end a request's iterator after an abort by id


@dataclass
class RequestState:
    """A request's sequence ids, its output queue, and which sequences have finished."""

    request_id: str  # the server's own id (keys the engine's state)
    seq_ids: list[str]
    stream: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: set[str] = field(default_factory=set)
    label: str = ""  # the client's id: returned in outputs, never used as a key


class RequestStream:
    """Async iterator over one request's outputs; :meth:`close` (or ``aclose``) aborts what still runs."""

    def __init__(self, client: Any, state: RequestState) -> None:
        self._client = client
        self._state = state
        self._remaining = len(state.seq_ids)
        self.request_id = state.label or state.request_id  # what the client named it
        self.internal_id = state.request_id

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining == 0:
            raise StopAsyncIteration
        try:
            item = await self._state.queue.get()
        except BaseException:  # cancelled (client gone, timeout): abort in the core
            self.close()
            raise
        if item is ABORTED:
            self._remaining = 0
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.outputs[0].finished:
            self._remaining -= 1
            if self._remaining == 0:
                self.close()
        return item

    def close(self) -> None:
        """Stop iterating; sequences still running are aborted and their blocks freed."""
        self._remaining = 0
        self._client._release(self._state)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        # A stream dropped without being read to the end or closed must not leave its request running. The
        # garbage collector may run this on any thread: hand the clean-up to the engine's event loop.
        loop = self._client._loop
        if self._remaining and loop is not None:
            try:
                loop.call_soon_threadsafe(self.close)
            except RuntimeError:  # the loop is closed: the engine is gone anyway
                pass
