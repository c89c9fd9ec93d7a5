"""pdserve: an LLM serving engine with prefill/decode disaggregation.

This folder holds the package root and the command line (``pdserve/cli``). The repository keeps the other parts at
its root (``engine/``, ``kernels/``, ``services/``, ``operator/``, ``proto/``, ``bench/``); ``pyproject.toml`` maps
each of them, and only them, under this package (``pdserve.engine`` is ``<repo>/engine``). Run from a source tree
through an editable install (``pip install -e .``); nothing else makes ``pdserve.*`` importable.

May import: every ``pdserve.*`` package, lazily (the router and the operator import this package and must not pull
in torch).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that light users (the router, the operator) never import torch.
    if name == "LLM":
        from pdserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
