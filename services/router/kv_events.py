"""The router's side of KV events: one ZeroMQ SUB socket per pod, feeding the prefix tracker and pod table.

Each batch from a pod's engine (see :mod:`pdserve.engine.kv_event_publisher`) updates the exact prefix index and
the pod's load, and keeps its stream "live" for ``live_for_s`` seconds; a pod whose stream goes quiet falls back
to the approximate index. A new ``engine_id`` (the engine restarted) drops what the index held for the pod.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import zmq
import zmq.asyncio

from pdserve.engine.kv_event_publisher import TOPIC, WIRE_VERSION, EventBatch, batch_decoder, from_wire
from pdserve.services.router.metrics import RouterMetrics
from pdserve.services.router.prefix_index import PrefixTracker
from pdserve.services.router.state import PodTable
from pdserve.services.router.types import LoadReport, PodState

logger = logging.getLogger(__name__)


class KVEventSubscriber:
    """Subscribes to every pod that advertises an event address, for as long as it is in the table."""

    def __init__(self, pods: PodTable, prefix: PrefixTracker, metrics: RouterMetrics | None = None,
                 live_for_s: float = 5.0) -> None:
        self.pods = pods
        self.prefix = prefix
        self.metrics = metrics
        self.live_for_s = live_for_s
        self._ctx = zmq.asyncio.Context()
        self._tasks: dict[str, asyncio.Task] = {}
        self._engine_ids: dict[str, str] = {}
        self._next_seq: dict[str, int] = {}
        pods.subscribe(self._on_membership)

    def start(self) -> None:
        """Subscribe to the pods already in the table (later ones are picked up as they are added)."""
        for pod in self.pods.all():
            self._on_membership("added", pod)

    def _on_membership(self, event: str, pod: PodState) -> None:
        task = self._tasks.pop(pod.name, None)
        if task is not None:
            task.cancel()
        self._engine_ids.pop(pod.name, None)
        self._next_seq.pop(pod.name, None)
        if event == "added" and pod.endpoint.kv_events:
            self._tasks[pod.name] = asyncio.get_running_loop().create_task(
                self._follow(pod.name, pod.endpoint.kv_events), name=f"kv-events-{pod.name}")

    async def _follow(self, pod: str, address: str) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
        sock.connect(address)  # ZeroMQ reconnects by itself when the pod restarts
        decoder = batch_decoder()
        try:
            while True:
                topic, payload = await sock.recv_multipart()
                try:
                    batch = decoder.decode(payload)
                except msgspec.DecodeError as exc:
                    logger.warning("undecodable KV event batch from %s dropped: %s", pod, exc)
                    continue
                self.apply(pod, batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("KV event subscriber for %s failed", pod)
        finally:
            sock.close(linger=0)

    def apply(self, pod: str, batch: EventBatch) -> None:
        """Apply one batch from ``pod`` (public for tests that feed batches without sockets)."""
        if batch.version != WIRE_VERSION:
            logger.warning("KV events from %s use wire version %d, expected %d; ignored", pod, batch.version,
                           WIRE_VERSION)
            return
        if self._engine_ids.get(pod) != batch.engine_id:
            if pod in self._engine_ids:
                logger.info("pod %s has a new engine (%s): its prefix index starts over", pod, batch.engine_id)
            self.prefix.exact.remove_pod(pod)
            self._engine_ids[pod] = batch.engine_id
        else:
            expected = self._next_seq.get(pod, batch.seq)
            if batch.seq != expected:
                # Lost batches: the index may hold stale blocks or miss new ones until they churn; routing
                # quality drops a little, correctness never depends on it.
                logger.warning("pod %s: %d KV event batch(es) lost", pod, batch.seq - expected)
                if self.metrics is not None:
                    self.metrics.kv_event_gaps.labels(pod).inc()
        self._next_seq[pod] = batch.seq + 1
        for msg in batch.events:
            self.prefix.on_event(pod, from_wire(msg))
            if self.metrics is not None:
                self.metrics.kv_events.labels(pod, type(msg).__name__.removesuffix("Msg").lower()).inc()
        if batch.load is not None:
            self.pods.set_load(pod, LoadReport(batch.load.num_waiting, batch.load.num_running,
                                               batch.load.kv_cache_usage, batch.timestamp), self.live_for_s)
        else:
            self.pods.mark_events_live(pod, self.live_for_s)

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ctx.term()
