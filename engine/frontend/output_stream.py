"""One request's output stream, as the API layer iterates it (the ``OutputStream`` of ``EngineClient``).

The async engine and the router both hand out these: outputs (or an exception) arrive on a queue, the stream
ends once each of the request's ``n`` sequences has finished, and closing it -- or cancelling the task that
iterates it -- stops whatever still runs (:meth:`OutputStream._stop`, which each front end implements).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from pdserve.engine.outputs import RequestOutput

ABORTED = object()  # queued to end a stream with no more output (an abort by id)


class OutputStream(ABC):
    """Async iterator over one request's outputs; :meth:`close` (or ``aclose``) stops what still runs.

    ``request_id`` is the client's label for the request; ``internal_id`` the server's own id.
    """

    def __init__(self, queue: asyncio.Queue[Any], num_sequences: int, internal_id: str, label: str = "") -> None:
        self.queue = queue
        self.internal_id = internal_id
        self.request_id = label or internal_id
        self._remaining = num_sequences
        self._closed = False

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining == 0:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled (client gone, timeout): stop the request
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
        """Stop iterating; sequences still running are stopped and their resources freed (idempotent)."""
        self._remaining = 0
        if not self._closed:
            self._closed = True
            self._stop()

    async def aclose(self) -> None:
        self.close()

    @abstractmethod
    def _stop(self) -> None:
        """Stop the request's sequences that still run (called once, by :meth:`close`)."""
