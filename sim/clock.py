"""Clocks for the simulated engine: wall time (a ``pdserve sim-engine`` process) or virtual time (``pdserve sim``).

The engine's step sleeps (wall) or advances (virtual) by what the cost model says; the simulated KV connector
reads the same clock to know which loads have landed.
"""

from __future__ import annotations

import time


class Clock:
    """Wall time: ``spend`` sleeps."""

    def now(self) -> float:
        return time.monotonic()

    def spend(self, seconds: float) -> None:
        """Let ``seconds`` pass for the caller (a model step's duration)."""
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock(Clock):
    """Simulated time that moves only when told: ``spend`` advances it, the event loop of the cluster sets it."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def spend(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    def advance_to(self, t: float) -> None:
        if t < self.t:
            raise ValueError(f"virtual time cannot go back from {self.t} to {t}")
        self.t = t
