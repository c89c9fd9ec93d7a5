"""Filters: drop pods that must not get a request.

The "soft" threshold filters keep every pod when all of them are over the threshold: refusing work is the
engines' admission control (429/503 from their waiting queue), not the router's.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence

from pdserve.services.router.plugins.base import Filter, PluginRegistry
from pdserve.services.router.types import PodState, Role, RoutingContext


class RoleFilter(Filter):
    """Keep pods whose role is one of ``roles``."""

    def __init__(self, roles: Sequence[str]) -> None:
        if isinstance(roles, str):
            roles = [roles]
        self.roles = {Role(r) for r in roles}  # ValueError on an unknown role name

    def filter(self, ctx: RoutingContext, pods: Sequence[PodState]) -> list[PodState]:
        return [p for p in pods if p.role in self.roles]


class LabelFilter(Filter):
    """Keep pods carrying every given label (e.g. a model variant or a zone)."""

    def __init__(self, match: Mapping[str, str]) -> None:
        self.match = dict(match)

    def filter(self, ctx: RoutingContext, pods: Sequence[PodState]) -> list[PodState]:
        return [p for p in pods if all(p.endpoint.labels.get(k) == v for k, v in self.match.items())]


class _SoftThreshold(Filter):
    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    @abstractmethod
    def over(self, pod: PodState) -> bool:
        """Whether ``pod`` is above this filter's threshold."""

    def filter(self, ctx: RoutingContext, pods: Sequence[PodState]) -> list[PodState]:
        kept = [p for p in pods if not self.over(p)]
        return kept if kept or self.strict else list(pods)


class QueueThresholdFilter(_SoftThreshold):
    """Drop pods whose waiting queue (engine report, or the router's own in-flight count) exceeds ``max_waiting``."""

    def __init__(self, max_waiting: int = 64, strict: bool = False) -> None:
        super().__init__(strict)
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting

    def over(self, pod: PodState) -> bool:
        waiting = pod.load.num_waiting if pod.load is not None else 0
        return waiting > self.max_waiting


class KVUsageThresholdFilter(_SoftThreshold):
    """Drop pods whose KV cache is fuller than ``max_usage`` (they would preempt or queue the request)."""

    def __init__(self, max_usage: float = 0.95, strict: bool = False) -> None:
        super().__init__(strict)
        if not 0.0 <= max_usage <= 1.0:
            raise ValueError(f"max_usage must be in [0, 1], got {max_usage}")
        self.max_usage = max_usage

    def over(self, pod: PodState) -> bool:
        return pod.load is not None and pod.load.kv_cache_usage > self.max_usage


def register(registry: PluginRegistry) -> None:
    registry.register("filter", "role", lambda deps, **kw: RoleFilter(**kw))
    registry.register("filter", "label", lambda deps, **kw: LabelFilter(**kw))
    registry.register("filter", "queue-threshold", lambda deps, **kw: QueueThresholdFilter(**kw))
    registry.register("filter", "kv-usage-threshold", lambda deps, **kw: KVUsageThresholdFilter(**kw))



