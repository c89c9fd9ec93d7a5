"""The routing facade: the pod table, the prefix tracker, sessions and the pipeline behind three calls.

``route`` picks pods for one attempt of a sequence, ``started`` / ``finished`` keep the in-flight counts and
the approximate prefix index in step with what was sent, and ``failed`` takes a failing pod out of rotation
until its health check passes again. The request flow (retries, resume) lives in
:mod:`pdserve.services.router.sequence`; discovery, health checks and KV events feed the tables from outside.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pdserve.services.router.hashing import PromptHasher
from pdserve.services.router.metrics import RouterMetrics
from pdserve.services.router.pipeline import RoutingPipeline
from pdserve.services.router.plugins import PluginDeps, default_registry
from pdserve.services.router.plugins.base import PluginRegistry
from pdserve.services.router.prefix_index import PrefixTracker
from pdserve.services.router.routing_config import RoutingSpec
from pdserve.services.router.state import PodTable, SessionTable
from pdserve.services.router.types import PodState, Role, RoutingContext, RoutingDecision

logger = logging.getLogger(__name__)


class Router:
    """Everything routing needs, wired once at start-up (see :func:`build_router`)."""

    def __init__(self, pods: PodTable, pipeline: RoutingPipeline, deps: PluginDeps, hasher: PromptHasher,
                 metrics: RouterMetrics | None = None, fail_threshold: int = 1) -> None:
        self.pods = pods
        self.pipeline = pipeline
        self.deps = deps
        self.hasher = hasher
        self.metrics = metrics
        self.fail_threshold = fail_threshold
        pods.subscribe(self._on_membership)

    def _on_membership(self, event: str, pod: PodState) -> None:
        if event == "removed":
            self.deps.prefix.remove_pod(pod.name)
        logger.info("pod %s %s (%s, %s)", pod.name, event, pod.role.value, pod.endpoint.grpc_target or pod.endpoint.url)

    def context(self, request_id: str, prompt_token_ids: list[int], session_key: str | None = None,
                excluded: set[str] | None = None, cache_salt: str | None = None) -> RoutingContext:
        """The routing context of one attempt; ``cache_salt`` enters the block hashes as it does on the pods."""
        return RoutingContext(request_id=request_id, prompt_token_ids=prompt_token_ids,
                              block_hashes=self.hasher.hash_prompt(prompt_token_ids, cache_salt),
                              block_size=self.hasher.block_size, session_key=session_key,
                              excluded=excluded if excluded is not None else set())

    def has_decode_pod(self) -> bool:
        return bool(self.pods.ready(lambda r: r.can_decode()))

    def route(self, ctx: RoutingContext) -> RoutingDecision:
        """Choose the pods for one attempt; raises :class:`~.pipeline.NoPodAvailable`."""
        decode_pods = self.pods.ready(lambda r: r.can_decode())
        # Only prefill pods serve the Prefill call: a monolithic pod computes its own prompts but hands no KV out.
        prefill_pods = self.pods.ready(lambda r: r == Role.PREFILL)
        decision = self.pipeline.route(ctx, decode_pods, prefill_pods)
        if self.metrics is not None:
            self.metrics.on_decision(ctx, decision)
        return decision

    def started(self, ctx: RoutingContext, decision: RoutingDecision) -> None:
        """The attempt is being sent: count it in flight and remember where its prefix is going."""
        now = self.deps.clock()
        for pod in _pods_of(decision):
            pod.in_flight += 1
            self.deps.prefix.on_routed(pod.name, ctx.block_hashes, now)
            if self.metrics is not None:
                self.metrics.in_flight(pod.name, pod.in_flight)
                self.metrics.pod_requests.labels(pod.name).inc()
        self.deps.sessions.set(ctx.session_key, decision.decode.name, now)

    def finished(self, pod: PodState, ok: bool = True) -> None:
        """One pod's part of an attempt ended."""
        pod.in_flight = max(0, pod.in_flight - 1)
        if ok:
            pod.consecutive_failures = 0
        if self.metrics is not None:
            self.metrics.in_flight(pod.name, pod.in_flight)

    def failed(self, pod: PodState, reason: str) -> None:
        """The pod failed a request: after ``fail_threshold`` failures in a row it leaves rotation until its
        health check passes (which the health checker notices within one interval)."""
        pod.consecutive_failures += 1
        if pod.ready and pod.consecutive_failures >= self.fail_threshold:
            pod.ready = False
            logger.warning("pod %s taken out of rotation: %r", pod.name, reason)
            if self.metrics is not None:
                self.metrics.pod_ready(pod.name, False)


def _pods_of(decision: RoutingDecision) -> Sequence[PodState]:
    return (decision.decode,) if decision.prefill is None else (decision.prefill, decision.decode)


def build_router(spec: RoutingSpec, hasher: PromptHasher, pods: PodTable | None = None,
                 metrics: RouterMetrics | None = None, registry: PluginRegistry | None = None,
                 deps: PluginDeps | None = None) -> Router:
    """Build the tables, plugins and pipeline from a routing spec."""
    if deps is None:
        prefix = spec.prefix
        deps = PluginDeps(prefix=PrefixTracker(prefix.approx_capacity_blocks, prefix.pending_ttl_s,
                                               prefix.approx_ttl_s), sessions=SessionTable())
    pipeline = RoutingPipeline(spec, registry or default_registry(), deps)
    return Router(pods or PodTable(), pipeline, deps, hasher, metrics)
