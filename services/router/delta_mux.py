"""The router's end of a pod's ``Deltas`` subscription (services/api/delta_hub.py has the pod's end and the why).

One :class:`DeltaSubscription` per pod channel reads the pod's batches and hands each response to the queue of the
call it belongs to (by the key the router put in that call's ``Delivery``). :func:`call_responses` gives one call's
responses, wherever the pod sent them, with the call's own ending and errors:

* the call's initial metadata says whether the pod delivers to the subscription or streams on the call;
* responses on the call are yielded as they come (a pod without the subscription);
* when the subscription closes while a call delivers to it, the call's remaining responses are lost: the call fails
  with :class:`SubscriptionLost` (the backend's ``PodError``), so the sequence runner retries or resumes it;
* a call that ended with OK while delivering is done when its last response (the usage one) arrives, which may
  come after the call's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc

from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.api.delta_hub import DELIVERY_METADATA, DELIVERY_VALUE

logger = logging.getLogger(__name__)


class SubscriptionLost(Exception):
    """The subscription a call delivered to closed before the call's last response."""


@dataclass(frozen=True)
class _Closed:
    """The subscription's stream ended (``reason``)."""
    reason: str


@dataclass(frozen=True)
class _Mode:
    """The call's initial metadata: whether the pod delivers its responses to the subscription."""
    delivered: bool


@dataclass(frozen=True)
class _OnCall:
    """A response that came on the call's own stream."""
    response: Any


@dataclass(frozen=True)
class _CallEnded:
    """The call's status: None for OK, else its error."""
    error: grpc.aio.AioRpcError | None


class DeltaSubscription:
    """One pod's ``Deltas`` stream, open from construction until the pod ends it or :meth:`close`.

    ``ready`` turns true when the pod's first (empty) batch says the subscription is registered there: only then
    do calls name it, so a fresh subscription never makes a call fall back."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] | None) -> None:
        self.id = uuid.uuid4().hex
        self.ready = False
        self.closed = False
        self.closed_at = 0.0  # time.monotonic() when it closed
        self.unimplemented = False  # the pod has no Deltas method (an older pod)
        self.batches = 0  # batches and items read, for tests and debugging
        self.items = 0
        self._queues: dict[str, asyncio.Queue] = {}
        self._call = pb_grpc.GenerationStub(channel).Deltas(pb.DeltasRequest(subscriber=self.id), metadata=metadata)
        self._task = asyncio.get_running_loop().create_task(self._read(), name=f"deltas-{self.id[:8]}")

    async def _read(self) -> None:
        reason = "the pod ended the stream"
        try:
            async for batch in self._call:
                self.ready = True
                self.batches += bool(batch.items)
                self.items += len(batch.items)
                for item in batch.items:
                    queue = self._queues.get(item.key)
                    if queue is not None:  # else a call the router has given up on
                        queue.put_nowait(item.response)
        except grpc.aio.AioRpcError as exc:
            self.unimplemented = exc.code() == grpc.StatusCode.UNIMPLEMENTED
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "the router closed the stream"
        finally:
            self.closed = True
            self.closed_at = time.monotonic()
            for queue in self._queues.values():
                queue.put_nowait(_Closed(reason))
        if not self.unimplemented:
            logger.info("Deltas subscription %s closed: %s", self.id[:8], reason)

    def register(self) -> tuple[pb.Delivery, asyncio.Queue]:
        """A new call's delivery (to put in its request) and the queue its responses will reach."""
        key = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[key] = queue
        return pb.Delivery(subscriber=self.id, key=key), queue

    def unregister(self, key: str) -> None:
        self._queues.pop(key, None)

    async def close(self) -> None:
        self._call.cancel()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def _pump(call: Any, queue: asyncio.Queue) -> None:
    """Put the call's mode, its own responses and its ending into ``queue``."""
    try:
        metadata = await call.initial_metadata()
        queue.put_nowait(_Mode(any(k == DELIVERY_METADATA and v == DELIVERY_VALUE for k, v in metadata or ())))
        async for resp in call:
            queue.put_nowait(_OnCall(resp))
        queue.put_nowait(_CallEnded(None))
    except grpc.aio.AioRpcError as exc:
        queue.put_nowait(_CallEnded(exc))


async def call_responses(call: Any, queue: asyncio.Queue) -> AsyncIterator[Any]:
    """The responses of ``call`` whose request named a subscription that feeds ``queue``; raises the call's
    ``AioRpcError`` when it fails, :class:`SubscriptionLost` when the subscription closes under a delivering
    call."""
    pump = asyncio.get_running_loop().create_task(_pump(call, queue))
    delivered: bool | None = None  # unknown until the call's initial metadata
    closed: str | None = None  # the subscription's end, while the mode is unknown
    call_ended = False
    try:
        while True:
            item = await queue.get()
            if isinstance(item, pb.GenerateResponse):  # from the subscription
                delivered = True
                yield item
                if item.HasField("usage"):
                    return  # the pod's last response
            elif isinstance(item, _OnCall):
                yield item.response
            elif isinstance(item, _Mode):
                delivered = item.delivered or delivered
                if delivered and closed is not None:
                    raise SubscriptionLost(closed)
            elif isinstance(item, _Closed):
                if delivered:
                    raise SubscriptionLost(item.reason)
                closed = item.reason
            elif isinstance(item, _CallEnded):
                if item.error is not None:
                    raise item.error
                call_ended = True
                if not delivered:
                    return  # it streamed on the call, and that stream is over
                if closed is not None:
                    raise SubscriptionLost(closed)
    finally:
        if not call_ended:
            pump.cancel()
