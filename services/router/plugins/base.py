"""The four plugin interfaces of the routing pipeline and the registry that builds them by name.

A routing *profile* runs ``filters`` (drop pods that must not get the request), then weighted ``scorers`` (each
scores every remaining pod in [0, 1]), then a ``picker`` (choose one pod from the weighted totals). The P/D
decider sits between the decode profile and the prefill profile: once a decode pod is chosen it says whether the
prompt should be prefilled on a prefill pod or computed by the decode pod itself.

Plugins are small objects built by factories from keyword parameters (from the routing config file or flags).
They read :class:`~pdserve.services.router.types.PodState` and write their findings into the per-request
:class:`~pdserve.services.router.types.RoutingContext`; they hold no per-request state of their own.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve.services.router.prefix_index import PrefixTracker
from pdserve.services.router.state import SessionTable
from pdserve.services.router.types import PodState, RoutingContext

KINDS = ("filter", "scorer", "picker", "pd-decider")


class Plugin(ABC):  # noqa: B024 - a common base; its subclasses (Filter, Scorer, ...) declare the abstract methods
    """Common base: every plugin has a type name (its registry key) for logs and metrics."""

    type_name: str = "plugin"

    @property
    def name(self) -> str:
        return self.type_name


class Filter(Plugin):
    """Drops pods that must not receive the request. Returning an empty list means "no pod fits"."""

    @abstractmethod
    def filter(self, ctx: RoutingContext, pods: Sequence[PodState]) -> list[PodState]: ...


class Scorer(Plugin):
    """Scores each pod in [0, 1]; higher is better. Must return a score for every pod it is given."""

    @abstractmethod
    def score(self, ctx: RoutingContext, pods: Sequence[PodState]) -> dict[str, float]: ...


@dataclass(frozen=True)
class ScoredPod:
    pod: PodState
    score: float  # weighted sum of the scorers' scores


class Picker(Plugin):
    """Chooses one pod from the scored candidates (never an empty list)."""

    @abstractmethod
    def pick(self, ctx: RoutingContext, candidates: Sequence[ScoredPod]) -> PodState: ...


@dataclass(frozen=True)
class PDDecision:
    remote_prefill: bool
    reason: str


class PDDecider(Plugin):
    """Given the chosen decode pod, decide between remote prefill and decode-only."""

    @abstractmethod
    def decide(self, ctx: RoutingContext, decode_pod: PodState) -> PDDecision: ...


@dataclass
class PluginDeps:
    """The router's shared tables that plugins may read, handed to every factory (never a global)."""

    prefix: PrefixTracker = field(default_factory=PrefixTracker)
    sessions: SessionTable = field(default_factory=SessionTable)
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)


# factory(deps, **params) -> plugin
Factory = Callable[..., Plugin]


class PluginRegistry:
    """Maps (kind, type name) to a factory. Build one with :func:`default_registry`; add your own plugins to it.

    An instance, not a module-level table: two routers in one process (tests) never see each other's plugins.
    """

    def __init__(self) -> None:
        self._factories: dict[tuple[str, str], Factory] = {}

    def register(self, kind: str, type_name: str, factory: Factory) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
        key = (kind, type_name)
        if key in self._factories:
            raise ValueError(f"a {kind} named {type_name!r} is already registered")
        self._factories[key] = factory

    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._factories if k == kind)

    def create(self, kind: str, type_name: str, deps: PluginDeps, **params: Any) -> Plugin:
        """Build a plugin; unknown names and bad parameters fail with a message that names the plugin."""
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
        factory = self._factories.get((kind, type_name))
        if factory is None:
            known = ", ".join(self.names(kind)) or "none"
            raise ValueError(f"unknown {kind} {type_name!r}; known: {known}")
        try:
            plugin = factory(deps, **params)
        except (TypeError, ValueError) as exc:  # unexpected / missing keyword, or a value out of range
            raise ValueError(f"bad parameters for {kind} {type_name!r}: {exc}") from None
        plugin.type_name = type_name
        return plugin


def clamp01(x: float) -> float:
    """Scores must stay in [0, 1]; a plugin bug must not let one scorer drown the others."""
    return 0.0 if x != x or x < 0.0 else (1.0 if x > 1.0 else x)  # x != x: NaN


def min_max_inverse(values: dict[str, float]) -> dict[str, float]:
    """Map "lower is better" values to [0, 1]: the lowest gets 1, the highest 0, all equal get 1."""
    if not values:
        return {}
    lo, hi = min(values.values()), max(values.values())
    if hi <= lo:
        return {k: 1.0 for k in values}
    return {k: (hi - v) / (hi - lo) for k, v in values.items()}
