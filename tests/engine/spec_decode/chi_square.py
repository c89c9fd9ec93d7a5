"""Chi-square tests without scipy: the p-value is the regularized upper incomplete gamma function."""

from __future__ import annotations

import torch


def p_value(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square with ``dof`` degrees of freedom."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed ``counts`` against the distribution ``probs`` (bins with zero probability must be
    empty: a count there fails at once)."""
    n = counts.sum()
    expected = probs.double() * n
    if bool((counts[expected == 0] > 0).any()):
        return 0.0
    live = expected > 0
    stat = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    return p_value(stat, int(live.sum()) - 1)


def two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value that two equal-sized samples' bin ``counts`` come from one distribution."""
    assert int(a.sum()) == int(b.sum())
    live = (a + b) > 0
    a, b = a[live].double(), b[live].double()
    stat = float(((a - b) ** 2 / (a + b)).sum())
    return p_value(stat, int(live.sum()) - 1) if live.sum() > 1 else 1.0
