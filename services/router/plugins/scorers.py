"""Scorers: each gives every candidate pod a score in [0, 1] (higher is better); the profile weights them."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.services.router.plugins.base import PluginDeps, PluginRegistry, Scorer, min_max_inverse
from pdserve.services.router.types import PodState, RoutingContext


class PrefixCacheScorer(Scorer):
    """Fraction of the prompt's full blocks that the pod already holds as a contiguous prefix.

    Exact (the engine's KV events) for pods whose event stream is live, approximate (where the router sent what)
    otherwise; see :class:`~pdserve.services.router.prefix_index.PrefixTracker`. Records the matched blocks in
    ``ctx.matched_blocks`` for the P/D decider and the hit-ratio metric.
    """

    def __init__(self, deps: PluginDeps) -> None:
        self.deps = deps

    def score(self, ctx: RoutingContext, pods: Sequence[PodState]) -> dict[str, float]:
        now = self.deps.clock()
        matched = self.deps.prefix.matched_blocks(ctx.block_hashes, ((p.name, p.events_live(now)) for p in pods),
                                                  now)
        ctx.matched_blocks.update(matched)
        total = len(ctx.block_hashes)
        return {p.name: (matched[p.name] / total if total else 0.0) for p in pods}


def _load_of(pod: PodState) -> int:
    """Requests queued or running on the pod. The router's own in-flight count is fresher than the last report
    (a report lags by up to its interval), the report also counts other routers' requests: take the larger."""
    reported = pod.load.num_waiting + pod.load.num_running if pod.load is not None else 0
    return max(reported, pod.in_flight)


class LoadScorer(Scorer):
    """``1 - load / saturation`` (clamped), where load is waiting + running requests: an idle pod scores 1 and a
    pod with ``saturation`` or more requests scores 0. Absolute rather than relative to the other pods, so a
    difference of one request between two nearly idle pods does not outweigh a long cached prefix."""

    def __init__(self, saturation: int = 16) -> None:
        if saturation <= 0:
            raise ValueError(f"saturation must be positive, got {saturation}")
        self.saturation = saturation

    def score(self, ctx: RoutingContext, pods: Sequence[PodState]) -> dict[str, float]:
        return {p.name: 1.0 - min(_load_of(p), self.saturation) / self.saturation for p in pods}


class QueueScorer(Scorer):
    """Relative waiting-queue depth: the shortest queue among the candidates scores 1, the longest 0."""

    def score(self, ctx: RoutingContext, pods: Sequence[PodState]) -> dict[str, float]:
        return min_max_inverse({p.name: float(p.load.num_waiting if p.load else 0) for p in pods})


class KVUsageScorer(Scorer):
    """``1 - kv_cache_usage``: free KV memory means fewer preemptions. A pod with no report yet scores 0.5."""

    def score(self, ctx: RoutingContext, pods: Sequence[PodState]) -> dict[str, float]:
        return {p.name: (1.0 - p.load.kv_cache_usage if p.load is not None else 0.5) for p in pods}


class SessionAffinityScorer(Scorer):
    """1 for the pod that served this session (header or ``user`` field) last, 0 for the others."""

    def __init__(self, deps: PluginDeps) -> None:
        self.deps = deps

    def score(self, ctx: RoutingContext, pods: Sequence[PodState]) -> dict[str, float]:
        sticky = self.deps.sessions.get(ctx.session_key, self.deps.clock())
        return {p.name: 1.0 if p.name == sticky else 0.0 for p in pods}


def register(registry: PluginRegistry) -> None:
    registry.register("scorer", "prefix-cache", lambda deps: PrefixCacheScorer(deps))
    registry.register("scorer", "load", lambda deps, **kw: LoadScorer(**kw))
    registry.register("scorer", "queue", lambda deps: QueueScorer())
    registry.register("scorer", "kv-usage", lambda deps: KVUsageScorer())
    registry.register("scorer", "session-affinity", lambda deps: SessionAffinityScorer(deps))
