"""Pickers: choose one pod from the scored candidates."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.services.router.plugins.base import Picker, PluginDeps, PluginRegistry, ScoredPod
from pdserve.services.router.types import PodState, RoutingContext


class MaxScorePicker(Picker):
    """The highest score wins; ties go to the pod with fewer in-flight requests, then to a random one."""

    def __init__(self, deps: PluginDeps, tolerance: float = 1e-9) -> None:
        self.rng = deps.rng
        self.tolerance = tolerance

    def pick(self, ctx: RoutingContext, candidates: Sequence[ScoredPod]) -> PodState:
        best = max(c.score for c in candidates)
        top = [c.pod for c in candidates if c.score >= best - self.tolerance]
        least = min(p.in_flight for p in top)
        top = [p for p in top if p.in_flight == least]
        return top[0] if len(top) == 1 else self.rng.choice(top)


class RandomPicker(Picker):
    """A random pod, weighted by score (uniform when every score is 0)."""

    def __init__(self, deps: PluginDeps) -> None:
        self.rng = deps.rng

    def pick(self, ctx: RoutingContext, candidates: Sequence[ScoredPod]) -> PodState:
        weights = [max(c.score, 0.0) for c in candidates]
        if sum(weights) <= 0:
            return self.rng.choice(candidates).pod
        return self.rng.choices(candidates, weights=weights)[0].pod


class RoundRobinPicker(Picker):
    """Cycles through the candidates in name order, ignoring scores (the baseline routing benchmarks compare to)."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, ctx: RoutingContext, candidates: Sequence[ScoredPod]) -> PodState:
        ordered = sorted(candidates, key=lambda c: c.pod.name)
        choice = ordered[self._next % len(ordered)].pod
        self._next += 1
        return choice


def register(registry: PluginRegistry) -> None:
    registry.register("picker", "max-score", lambda deps, **kw: MaxScorePicker(deps, **kw))
    registry.register("picker", "random", lambda deps: RandomPicker(deps))
    registry.register("picker", "round-robin", lambda deps: RoundRobinPicker())
