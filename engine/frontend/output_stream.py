"""One request's output stream, as the API layer iterates it (the ``OutputStream`` of ``EngineClient``).

The async engine and the router both hand out these: outputs (or an exception) arrive on a queue, the stream
ends once each of the request's ``n`` sequences has finished, and closing it -- or cancelling the task that
iterates it -- stops whatever still runs (:meth:`OutputStream._stop`, which each front end implements).

Outputs that are already waiting when the reader comes back are handed over as one: consecutive streamed deltas
of the same sequence merge (:func:`merge_deltas`). A reader that keeps up sees one output per engine step; one
that fell behind (a busy API server streaming to hundreds of clients) catches up with one event for all it missed
instead of one per token, so the work per token shrinks exactly when the process is short of CPU, rather than
the backlog growing until every stream stalls (measured on an H100 at 60 req/s: docs/performance.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
from abc import ABC, abstractmethod
from typing import Any

from pdserve.engine.outputs import CompletionOutput, RequestOutput

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
        self._held: Any = None  # an item taken off the queue while merging that did not merge: served next

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining == 0:
            raise StopAsyncIteration
        try:
            item = await self._next_item()
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

    async def _next_item(self) -> Any:
        """The next output with every delta of the same sequence already waiting merged into it, or an
        exception / ``ABORTED``."""
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self.queue.get()
        while isinstance(item, RequestOutput) and not item.outputs[0].finished and not self.queue.empty():
            nxt = self.queue.get_nowait()
            merged = merge_deltas(item, nxt)
            if merged is None:
                self._held = nxt
                break
            item = merged
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


def merge_deltas(first: RequestOutput, second: Any) -> RequestOutput | None:
    """One output carrying ``first``'s delta followed by ``second``'s, or None when they do not merge (not two
    deltas of the same sequence: another sequence of the request, an exception, ``ABORTED``). Text, token ids and
    logprob rows concatenate; the finish, cumulative logprob and timeline are the later output's."""
    if not isinstance(second, RequestOutput) or second.outputs[0].index != first.outputs[0].index:
        return None
    a, b = first.outputs[0], second.outputs[0]
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    comp = CompletionOutput(index=a.index, text=a.text + b.text, token_ids=a.token_ids + b.token_ids,
                            finish_reason=b.finish_reason, stop_reason=b.stop_reason, logprobs=logprobs,
                            cumulative_logprob=b.cumulative_logprob)
    return dataclasses.replace(
        second, outputs=[comp], timing=second.timing or first.timing,
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else second.prompt_logprobs)
