"""The router's plain data: pods as discovered, their live state, and one object of per-request state.

Everything the plugins see goes through these types, so a plugin never reaches into the router's tables and a
test builds its inputs with a few constructor calls.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Mapping


class Role(str, enum.Enum):
    """What an engine pod does. ``both`` is a monolithic engine: it can serve a request alone."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    def can_decode(self) -> bool:
        return self in (Role.DECODE, Role.BOTH)

    def can_prefill(self) -> bool:
        return self in (Role.PREFILL, Role.BOTH)


@dataclass(frozen=True)
class Endpoint:
    """A pod as discovery sees it: where to reach it. Identity is ``name`` (unique among live pods).

    ``url`` is the pod's HTTP base URL; ``grpc_target`` (``host:port``) its gRPC server; ``kv_events`` the ZeroMQ
    address its engine publishes KV events and load reports on (None: no event stream, the router falls back to
    its approximate prefix index).
    """

    name: str
    role: Role
    url: str
    grpc_target: str | None = None
    kv_events: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class LoadReport:
    """An engine's load, as its core reports it (over the KV event stream) or the router scrapes it."""

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, [0, 1]
    timestamp: float = 0.0  # time.time() at the engine when the report was made


@dataclass
class PodState:
    """What the router knows about one pod right now. Owned by the pod table; plugins read it only."""

    endpoint: Endpoint
    ready: bool = False  # passed its last health check
    load: LoadReport | None = None
    in_flight: int = 0  # requests the router has sent and not yet seen finish
    consecutive_failures: int = 0
    events_live_until: float = 0.0  # the KV event stream counts as live until this time.time()

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def role(self) -> Role:
        return self.endpoint.role

    def events_live(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) < self.events_live_until


@dataclass
class RoutingContext:
    """All per-request state of one routing decision, filled in as the pipeline runs.

    The front end sets the inputs; plugins write their findings (e.g. the prefix scorer's matched blocks per
    pod) so that later plugins (the P/D decider) and the metrics can use them without recomputing.
    """

    request_id: str
    prompt_token_ids: list[int]
    block_hashes: list[int]
    block_size: int
    session_key: str | None = None  # from a header or the OpenAI ``user`` field
    excluded: set[str] = field(default_factory=set)  # pods that already failed this request
    # Written by plugins:
    matched_blocks: dict[str, int] = field(default_factory=dict)  # pod name -> longest cached prefix (blocks)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # profile -> pod -> weighted total
    attributes: dict[str, Any] = field(default_factory=dict)  # free-form notes for metrics/debugging

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def cached_tokens_on(self, pod_name: str) -> int:
        """Prompt tokens the pod is believed to hold already (0 if the prefix scorer did not run)."""
        return min(self.matched_blocks.get(pod_name, 0) * self.block_size, self.num_prompt_tokens)


@dataclass(frozen=True)
class RoutingDecision:
    """Where one attempt of a request goes: a decode pod, and a prefill pod when prefill runs remotely."""

    decode: PodState
    prefill: PodState | None = None
    reason: str = ""  # why the P/D decider chose so (for logs and metrics)

    @property
    def remote_prefill(self) -> bool:
        return self.prefill is not None
