"""P/D deciders: remote prefill on a prefill pod, or let the chosen decode pod compute the prompt itself."""

from __future__ import annotations

from pdserve.services.router.plugins.base import PDDecider, PDDecision, PluginRegistry
from pdserve.services.router.types import PodState, RoutingContext


class PrefixAwareDecider(PDDecider):
    """Decode-only when the prompt is short, or when most of it is already cached on the chosen decode pod:
    shipping KV for a few hundred tokens costs more than computing them where they are needed.

    Remote prefill when at least ``min_prompt_tokens`` prompt tokens exist *and* less than
    ``max_cached_fraction`` of the prompt is cached on the decode pod.
    """

    def __init__(self, min_prompt_tokens: int = 256, max_cached_fraction: float = 0.8) -> None:
        if min_prompt_tokens < 0:
            raise ValueError(f"min_prompt_tokens must be >= 0, got {min_prompt_tokens}")
        if not 0.0 <= max_cached_fraction <= 1.0:
            raise ValueError(f"max_cached_fraction must be in [0, 1], got {max_cached_fraction}")
        self.min_prompt_tokens = min_prompt_tokens
        self.max_cached_fraction = max_cached_fraction

    def decide(self, ctx: RoutingContext, decode_pod: PodState) -> PDDecision:
        n = ctx.num_prompt_tokens
        if n < self.min_prompt_tokens:
            return PDDecision(False, "short-prompt")
        cached = ctx.cached_tokens_on(decode_pod.name)
        if n and cached / n >= self.max_cached_fraction:
            return PDDecision(False, "cached-on-decode")
        return PDDecision(True, "remote-prefill")


class AlwaysRemoteDecider(PDDecider):
    """Every request is prefilled on a prefill pod (when one is available)."""

    def decide(self, ctx: RoutingContext, decode_pod: PodState) -> PDDecision:
        return PDDecision(True, "always")


class NeverRemoteDecider(PDDecider):
    """No remote prefill: decode pods compute prompts themselves (aggregated serving through the router)."""

    def decide(self, ctx: RoutingContext, decode_pod: PodState) -> PDDecision:
        return PDDecision(False, "never")


def register(registry: PluginRegistry) -> None:
    registry.register("pd-decider", "prefix-aware", lambda deps, **kw: PrefixAwareDecider(**kw))
    registry.register("pd-decider", "always", lambda deps: AlwaysRemoteDecider())
    registry.register("pd-decider", "never", lambda deps: NeverRemoteDecider())
