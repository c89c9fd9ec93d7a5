"""Builders for router tests: pods, contexts and a fixed clock, in one line each."""

from __future__ import annotations

import random

from pdserve.engine.core.block_hash import BlockHasher
from pdserve.services.router.plugins import PluginDeps
from pdserve.services.router.prefix_index import PrefixTracker
from pdserve.services.router.state import SessionTable
from pdserve.services.router.types import Endpoint, LoadReport, PodState, Role, RoutingContext

BLOCK = 4
NOW = 1_000_000.0


def pod(name: str, role: str = "decode", waiting: int | None = None, running: int = 0, kv: float = 0.0,
        in_flight: int = 0, live: bool = False, labels: dict | None = None, ready: bool = True) -> PodState:
    """A pod; ``waiting=None`` means no load report yet; ``live`` makes its event stream live at ``NOW``."""
    state = PodState(Endpoint(name, Role(role), f"http://{name}:8000", labels=labels or {}), ready=ready,
                     in_flight=in_flight)
    if waiting is not None:
        state.load = LoadReport(num_waiting=waiting, num_running=running, kv_cache_usage=kv, timestamp=NOW)
    if live:
        state.events_live_until = NOW + 60
    return state


def ctx(tokens: list[int] | int = 0, session: str | None = None, excluded: set[str] | None = None,
        block_size: int = BLOCK) -> RoutingContext:
    toks = list(range(1, tokens + 1)) if isinstance(tokens, int) else list(tokens)
    return RoutingContext(request_id="r", prompt_token_ids=toks, block_hashes=hasher(block_size).hash_prefix(toks),
                          block_size=block_size, session_key=session, excluded=set(excluded or ()))


def hasher(block_size: int = BLOCK) -> BlockHasher:
    return BlockHasher(block_size)


def deps(seed: int = 0) -> PluginDeps:
    return PluginDeps(prefix=PrefixTracker(), sessions=SessionTable(), clock=lambda: NOW, rng=random.Random(seed))
