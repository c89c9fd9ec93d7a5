"""The search of ``pdserve bench tune``: coordinate descent over engine settings, bounded by a trial budget, and
the table of what it measured. No I/O here: :func:`coordinate_descent` calls the measuring function it is given.

Coordinate descent starts from the first value of every setting, then, one setting at a time, tries each of its
other values with the rest held at the best so far, keeps the best, and sweeps again until a sweep changes
nothing (or the budget is spent). With ``k`` settings of ``n`` values it measures about ``k (n - 1) + 1``
candidates per sweep where the grid has ``n ** k``. A candidate is never measured twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trial:
    """One measured candidate: its settings, the flags that gave them, and what the run measured."""

    index: int
    settings: dict[str, Any]
    flags: list[str]
    summary: dict[str, Any] = field(default_factory=dict)  # bench serve's summary (empty if the run failed)
    error: str = ""  # why there is no measurement (the server refused the settings, died, ...)

    @property
    def goodput(self) -> float:
        return float(self.summary.get("goodput", 0.0)) if not self.error else 0.0

    @property
    def score(self) -> tuple[float, float]:
        """Goodput first; output throughput breaks ties (e.g. when every request meets the SLOs)."""
        if self.error:
            return (-1.0, 0.0)
        return (self.goodput, float(self.summary.get("output_throughput", 0.0)))


def coordinate_descent(space: dict[str, list[Any]], measure: Callable[[dict[str, Any]], Trial],
                       max_trials: int) -> list[Trial]:
    """Measure candidates of ``space`` (setting -> values, first value = starting point) as described in the
    module docstring; returns every trial in the order run (at most ``max_trials``)."""
    if max_trials < 1:
        raise ValueError("max_trials must be at least 1")
    trials: dict[tuple, Trial] = {}

    def key(settings: dict[str, Any]) -> tuple:
        return tuple(settings[name] for name in space)

    def run(settings: dict[str, Any]) -> Trial | None:
        k = key(settings)
        if k not in trials:
            if len(trials) >= max_trials:
                return None
            trials[k] = measure(settings)
        return trials[k]

    current = {name: values[0] for name, values in space.items()}
    best = run(current)
    assert best is not None
    changed = True
    while changed and len(trials) < max_trials:
        changed = False
        for name, values in space.items():
            for value in values:
                trial = run({**current, name: value})
                if trial is None:
                    return list(trials.values())
                if trial.score > best.score:
                    best, current, changed = trial, dict(trial.settings), True
    return list(trials.values())


def best_trial(trials: list[Trial]) -> Trial:
    """The trial with the highest goodput (then output throughput); the earliest among equals."""
    return max(trials, key=lambda t: (t.score, -t.index))


def grid_size(space: dict[str, list[Any]]) -> int:
    return math.prod(len(v) for v in space.values())


def format_table(trials: list[Trial], names: list[str], slo_keys: list[str]) -> str:
    """Every trial as a row: its settings, goodput, whether the SLOs were met, each SLO's value and the output
    throughput; the best is marked with ``*``."""
    best = best_trial(trials)
    head = ["trial", *names, "goodput req/s", "meets SLOs", *(f"{k} (s)" for k in slo_keys), "out tok/s", "note"]
    rows = []
    for t in trials:
        s = t.summary
        slo_values = s.get("slo_values_s", {})
        rows.append([f"{'*' if t is best else ' '}{t.index}", *(str(t.settings[n]) for n in names),
                     f"{t.goodput:.3f}", "-" if t.error else str(bool(s.get("meets_slos"))),
                     *("-" if t.error else f"{slo_values.get(k, math.nan):.4f}" for k in slo_keys),
                     "-" if t.error else f"{s.get('output_throughput', 0.0):.1f}",
                     t.error[:60] if t.error else (f"{s['failed']} failed" if s.get("failed") else "")])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
