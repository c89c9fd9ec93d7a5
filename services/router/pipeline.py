"""The routing pipeline: decode profile -> P/D decider -> (prefill profile). Pure: no I/O, no clocks of its own.

::

    ready decode pods ─▶ filters ─▶ weighted scorers ─▶ picker ─▶ decode pod ─▶ P/D decider ─┬─▶ decode-only
                                                                                               └─▶ prefill profile
    ready prefill pods ─▶ filters ─▶ weighted scorers ─▶ picker ─▶ prefill pod ◀──────────────┘

Pods that already failed this request (``ctx.excluded``) are never candidates. When remote prefill is asked for
but no prefill pod is left, the request goes decode-only: a decode engine can always compute the prompt itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.services.router.plugins.base import (Filter, PDDecider, Picker, PluginDeps, PluginRegistry, Scorer,
                                                  ScoredPod, clamp01)
from pdserve.services.router.routing_config import ProfileSpec, RoutingSpec
from pdserve.services.router.types import PodState, Role, RoutingContext, RoutingDecision


class NoPodAvailable(Exception):
    """No pod can take the request (all down, excluded by retries, or filtered out)."""


@dataclass
class Profile:
    """One filter -> score -> pick run over a set of candidate pods."""

    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker

    @classmethod
    def build(cls, name: str, spec: ProfileSpec, registry: PluginRegistry, deps: PluginDeps) -> "Profile":
        return cls(name=name,
                   filters=[registry.create("filter", f.type, deps, **f.params) for f in spec.filters],
                   scorers=[(registry.create("scorer", s.type, deps, **s.params), s.weight) for s in spec.scorers],
                   picker=registry.create("picker", spec.picker.type, deps, **spec.picker.params))

    def run(self, ctx: RoutingContext, pods: Sequence[PodState]) -> PodState:
        """Choose one pod; raise :class:`NoPodAvailable` naming what emptied the list."""
        candidates = [p for p in pods if p.name not in ctx.excluded]
        if not candidates:
            raise NoPodAvailable(f"no ready {self.name} pod" + (" left to retry on" if pods else ""))
        for f in self.filters:
            kept = f.filter(ctx, candidates)
            dropped = len(candidates) - len(kept)
            if dropped:
                ctx.attributes.setdefault("filtered", []).append((self.name, f.name, dropped))
            candidates = kept
            if not candidates:
                raise NoPodAvailable(f"filter {f.name!r} left no {self.name} pod")
        totals = {p.name: 0.0 for p in candidates}
        per_scorer: dict[str, dict[str, float]] = {}
        for scorer, weight in self.scorers:
            raw = scorer.score(ctx, candidates)
            scores = {p.name: clamp01(raw.get(p.name, 0.0)) for p in candidates}
            per_scorer[scorer.name] = scores
            for name, s in scores.items():
                totals[name] += weight * s
        ctx.scores[self.name] = totals
        choice = self.picker.pick(ctx, [ScoredPod(p, totals[p.name]) for p in candidates])
        ctx.attributes.setdefault("decisive", []).extend(
            (self.name, scorer) for scorer in _decisive_scorers(per_scorer, choice.name))
        return choice


def _decisive_scorers(per_scorer: dict[str, dict[str, float]], chosen: str) -> list[str]:
    """Scorers that told the pods apart and ranked the chosen one first (for the "decisions by plugin" metric)."""
    out = []
    for name, scores in per_scorer.items():
        values = scores.values()
        if max(values) > min(values) and scores[chosen] >= max(values):
            out.append(name)
    return out


class RoutingPipeline:
    """Builds the profiles and the P/D decider from a :class:`RoutingSpec`, then routes requests."""

    def __init__(self, spec: RoutingSpec, registry: PluginRegistry, deps: PluginDeps) -> None:
        self.spec = spec
        self.decode = Profile.build("decode", spec.decode, registry, deps)
        self.prefill = Profile.build("prefill", spec.prefill, registry, deps)
        decider = registry.create("pd-decider", spec.pd_decider.type, deps, **spec.pd_decider.params)
        assert isinstance(decider, PDDecider)
        self.decider = decider

    def route(self, ctx: RoutingContext, decode_pods: Sequence[PodState],
              prefill_pods: Sequence[PodState]) -> RoutingDecision:
        """Pick a decode pod, then a prefill pod if the decider asks for remote prefill and one is available."""
        decode = self.decode.run(ctx, decode_pods)
        if decode.role == Role.BOTH:
            return RoutingDecision(decode, None, "monolithic")  # it has no Decode call to load KV with
        if not prefill_pods:
            return RoutingDecision(decode, None, "no-prefill-pods")
        verdict = self.decider.decide(ctx, decode)
        if not verdict.remote_prefill:
            return RoutingDecision(decode, None, verdict.reason)
        try:
            prefill = self.prefill.run(ctx, [p for p in prefill_pods if p.name != decode.name])
        except NoPodAvailable:
            return RoutingDecision(decode, None, "no-prefill-available")
        return RoutingDecision(decode, prefill, verdict.reason)
