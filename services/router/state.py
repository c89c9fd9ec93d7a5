"""The router's live tables: the pod table (membership, health, load, in-flight) and session affinity.

Both are touched only from the router's event loop (discovery, health checks, event subscribers and requests
all run there), so they need no locks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from pdserve.services.router.types import Endpoint, LoadReport, PodState, Role

# Membership listeners get (event, pod state) with event "added" | "removed".
Listener = Callable[[str, PodState], None]


class PodTable:
    """Every known pod and what the router knows about it. Discovery adds and removes; others update."""

    def __init__(self) -> None:
        self._pods: dict[str, PodState] = {}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def upsert(self, endpoint: Endpoint) -> PodState:
        """Add a pod, or replace its endpoint if it changed (a restarted pod with a new address starts fresh)."""
        old = self._pods.get(endpoint.name)
        if old is not None and old.endpoint == endpoint:
            return old
        if old is not None:
            self.remove(endpoint.name)
        state = PodState(endpoint)
        self._pods[endpoint.name] = state
        for listener in self._listeners:
            listener("added", state)
        return state

    def remove(self, name: str) -> None:
        state = self._pods.pop(name, None)
        if state is not None:
            for listener in self._listeners:
                listener("removed", state)

    def replace_all(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the table hold exactly these endpoints (a full resync from discovery)."""
        wanted = {e.name: e for e in endpoints}
        for name in [n for n in self._pods if n not in wanted]:
            self.remove(name)
        for endpoint in wanted.values():
            self.upsert(endpoint)

    def get(self, name: str) -> PodState | None:
        return self._pods.get(name)

    def all(self) -> list[PodState]:
        return list(self._pods.values())

    def ready(self, role_ok: Callable[[Role], bool] | None = None) -> list[PodState]:
        return [p for p in self._pods.values() if p.ready and (role_ok is None or role_ok(p.role))]

    def set_load(self, name: str, report: LoadReport, live_for_s: float) -> None:
        """Record a load report; it also proves the pod's event stream is alive for ``live_for_s``."""
        state = self._pods.get(name)
        if state is not None:
            state.load = report
            state.events_live_until = time.time() + live_for_s

    def mark_events_live(self, name: str, live_for_s: float) -> None:
        state = self._pods.get(name)
        if state is not None:
            state.events_live_until = time.time() + live_for_s


class SessionTable:
    """Session key -> the decode pod that served it last, LRU-bounded so it never grows without limit."""

    def __init__(self, capacity: int = 100_000, ttl_s: float = 3600.0) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str | None, now: float) -> str | None:
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None or now - entry[1] > self.ttl_s:
            return None
        return entry[0]

    def set(self, key: str | None, pod: str, now: float) -> None:
        if key is None:
            return
        self._entries[key] = (pod, now)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
