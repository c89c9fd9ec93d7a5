"""Routing plugins: interfaces, the built-in filters / scorers / pickers / P/D deciders, and their registry.

May import: ``pdserve.services.router`` types only; no torch (tests/test_no_torch_imports.py).
"""

from __future__ import annotations

from pdserve.services.router.plugins import deciders, filters, pickers, scorers
from pdserve.services.router.plugins.base import (Filter, PDDecider, PDDecision, Picker, PluginDeps, PluginRegistry,
                                                  Scorer, ScoredPod)


def default_registry() -> PluginRegistry:
    """A fresh registry holding every built-in plugin."""
    registry = PluginRegistry()
    for module in (filters, scorers, pickers, deciders):
        module.register(registry)
    return registry


__all__ = ["Filter", "Scorer", "Picker", "PDDecider", "PDDecision", "ScoredPod", "PluginDeps", "PluginRegistry",
           "default_registry"]
