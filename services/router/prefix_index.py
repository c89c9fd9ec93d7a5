"""Which pod holds which prompt prefix: an exact index fed by the engines' KV events, and an approximate one.

Both are keyed by the chained block hashes of :mod:`pdserve.engine.core.block_hash`: a hash names a whole
prefix, so "pod P holds hash h_i" means P can skip the first ``i + 1`` blocks of any prompt whose i-th hash is h_i.

* :class:`PrefixIndex` mirrors each engine's prefix cache from its ``BlockStored`` / ``BlockRemoved`` /
  ``AllBlocksCleared`` events. It is exact up to event delivery delay.
* :class:`ApproxPrefixIndex` remembers where the router itself sent each prompt (LRU per pod, with an age limit).
  It is the fallback for pods whose events do not arrive, and it covers the gap between routing a prompt and
  the engine's ``BlockStored`` event for it (so a burst of requests with a new shared prefix stays together).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from pdserve.engine.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent


class PrefixIndex:
    """Exact mirror of every pod's prefix cache, built from KV events."""

    def __init__(self) -> None:
        self._pods_of: dict[int, set[str]] = {}
        self._hashes_of: dict[str, set[int]] = {}

    def apply(self, pod: str, event: KVCacheEvent) -> None:
        """Apply one event from ``pod``'s engine."""
        if isinstance(event, BlockStored):
            held = self._hashes_of.setdefault(pod, set())
            for h in event.block_hashes:
                self._pods_of.setdefault(h, set()).add(pod)
                held.add(h)
        elif isinstance(event, BlockRemoved):
            held = self._hashes_of.get(pod)
            if held is None:
                return
            for h in event.block_hashes:
                if h in held:
                    held.discard(h)
                    self._drop(h, pod)
        elif isinstance(event, AllBlocksCleared):
            self.remove_pod(pod)
        else:
            raise TypeError(f"not a KV cache event: {event!r}")

    def remove_pod(self, pod: str) -> None:
        """Forget everything about ``pod`` (it left, restarted, or cleared its cache)."""
        for h in self._hashes_of.pop(pod, ()):
            self._drop(h, pod)

    def _drop(self, block_hash: int, pod: str) -> None:
        pods = self._pods_of.get(block_hash)
        if pods is not None:
            pods.discard(pod)
            if not pods:
                del self._pods_of[block_hash]

    def num_blocks(self, pod: str) -> int:
        return len(self._hashes_of.get(pod, ()))

    def match(self, block_hashes: Sequence[int], pods: Iterable[str]) -> dict[str, int]:
        """For each pod, how many leading blocks of the prompt it holds (a contiguous prefix only)."""
        result = {p: 0 for p in pods}
        alive = set(result)
        for i, h in enumerate(block_hashes):
            alive &= self._pods_of.get(h, set())
            if not alive:
                break
            for p in alive:
                result[p] = i + 1
        return result


class ApproxPrefixIndex:
    """Where the router sent which prefix, per pod: an LRU of block hashes with the time each was last sent.

    ``capacity_blocks`` bounds memory per pod and roughly models the engine's own LRU eviction; entries older than
    the ``max_age_s`` given to :meth:`match` are treated as evicted.
    """

    def __init__(self, capacity_blocks: int = 65536) -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks must be positive, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._lru: dict[str, OrderedDict[int, float]] = {}

    def record(self, pod: str, block_hashes: Sequence[int], now: float) -> None:
        """Note that ``pod`` was sent a prompt with these block hashes at ``now``."""
        lru = self._lru.setdefault(pod, OrderedDict())
        for h in block_hashes:
            lru[h] = now
            lru.move_to_end(h)
        while len(lru) > self.capacity_blocks:
            lru.popitem(last=False)

    def remove_pod(self, pod: str) -> None:
        self._lru.pop(pod, None)

    def forget(self, pod: str, block_hashes: Iterable[int]) -> None:
        """Drop entries the engine reported evicted (keeps the approximate view from contradicting events)."""
        lru = self._lru.get(pod)
        if lru is not None:
            for h in block_hashes:
                lru.pop(h, None)

    def match(self, block_hashes: Sequence[int], pods: Iterable[str], now: float,
              max_age_s: float) -> dict[str, int]:
        """Leading blocks of the prompt sent to each pod within the last ``max_age_s`` seconds."""
        oldest = now - max_age_s
        result = {}
        for p in pods:
            lru = self._lru.get(p)
            n = 0
            if lru:
                for h in block_hashes:
                    t = lru.get(h)
                    if t is None or t < oldest:
                        break
                    n += 1
            result[p] = n
        return result


class PrefixTracker:
    """The prefix view the router routes by: exact where a pod's events are live, approximate elsewhere.

    For a pod with a live event stream the answer is the longer of its exact match and what the router sent it in
    the last ``pending_ttl_s`` seconds (its engine has not reported those blocks yet). For a pod without events
    it is what the router sent it in the last ``approx_ttl_s`` seconds.
    """

    def __init__(self, approx_capacity_blocks: int = 65536, pending_ttl_s: float = 10.0,
                 approx_ttl_s: float = 600.0) -> None:
        self.exact = PrefixIndex()
        self.approx = ApproxPrefixIndex(approx_capacity_blocks)
        self.pending_ttl_s = pending_ttl_s
        self.approx_ttl_s = approx_ttl_s

    def matched_blocks(self, block_hashes: Sequence[int], pods: Iterable[tuple[str, bool]],
                       now: float) -> dict[str, int]:
        """``pods`` is ``(name, events_live)`` pairs; returns leading cached blocks per pod."""
        pods = list(pods)
        live = [name for name, is_live in pods if is_live]
        blind = [name for name, is_live in pods if not is_live]
        result = self.approx.match(block_hashes, blind, now, self.approx_ttl_s) if blind else {}
        if live:
            exact = self.exact.match(block_hashes, live)
            pending = self.approx.match(block_hashes, live, now, self.pending_ttl_s)
            for name in live:
                result[name] = max(exact[name], pending[name])
        return result

    def on_routed(self, pod: str, block_hashes: Sequence[int], now: float) -> None:
        if block_hashes:
            self.approx.record(pod, block_hashes, now)

    def on_event(self, pod: str, event: KVCacheEvent) -> None:
        self.exact.apply(pod, event)
        if isinstance(event, BlockRemoved):
            self.approx.forget(pod, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self.approx.remove_pod(pod)

    def remove_pod(self, pod: str) -> None:
        self.exact.remove_pod(pod)
        self.approx.remove_pod(pod)
