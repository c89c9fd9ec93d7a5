"""Health checks: every pod is probed on an interval; a failing pod leaves rotation, a recovered one returns.

A probe is the pod's standard ``grpc.health.v1`` check. ``unhealthy_after`` failed probes in a row take a pod out
(one by default: a dead pod should stop getting traffic at once); one passing probe brings it back. Request
failures also take a pod out early (:meth:`Router.failed`); the next passing probe brings it back.
"""

from __future__ import annotations

import asyncio
import logging

from pdserve.services.router.backend import PodBackend
from pdserve.services.router.metrics import RouterMetrics
from pdserve.services.router.state import PodTable
from pdserve.services.router.types import PodState

logger = logging.getLogger(__name__)


class HealthChecker:
    """Probes every pod in the table every ``interval_s`` seconds (new pods right away)."""

    def __init__(self, pods: PodTable, backend: PodBackend, interval_s: float = 1.0, timeout_s: float = 1.0,
                 unhealthy_after: int = 1, metrics: RouterMetrics | None = None) -> None:
        self.pods = pods
        self.backend = backend
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.unhealthy_after = unhealthy_after
        self.metrics = metrics
        self._failures: dict[str, int] = {}
        self._wake = asyncio.Event()
        pods.subscribe(self._on_membership)

    def _on_membership(self, event: str, pod: PodState) -> None:
        if event == "added":
            self._wake.set()  # probe a new pod now rather than at the next tick
        else:
            self._failures.pop(pod.name, None)
            if self.metrics is not None:
                self.metrics.pod_removed(pod.name)

    async def check_all(self) -> None:
        pods = self.pods.all()
        results = await asyncio.gather(*(self.backend.check_health(p.endpoint, self.timeout_s) for p in pods),
                                       return_exceptions=True)
        for pod, ok in zip(pods, results):
            if self.pods.get(pod.name) is not pod:
                continue  # replaced or removed while probing
            self._apply(pod, ok is True)

    def _apply(self, pod: PodState, ok: bool) -> None:
        if ok:
            self._failures[pod.name] = 0
            if not pod.ready:
                logger.info("pod %s is healthy: in rotation", pod.name)
                pod.consecutive_failures = 0
            pod.ready = True
        else:
            n = self._failures.get(pod.name, 0) + 1
            self._failures[pod.name] = n
            if pod.ready and n >= self.unhealthy_after:
                logger.warning("pod %s failed %d health check(s): out of rotation", pod.name, n)
                pod.ready = False
        if self.metrics is not None:
            self.metrics.pod_ready(pod.name, pod.ready, pod.role.value)

    async def run(self) -> None:
        """Probe forever (cancel to stop)."""
        while True:
            try:
                await self.check_all()
            except Exception:  # never let one bad probe stop health checking
                logger.exception("health check round failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
