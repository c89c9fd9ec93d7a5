"""pdserve: an LLM serving engine with prefill/decode disaggregation.

The repository keeps ``engine/``, ``kernels/``, ``services/``, ``operator/`` and ``proto/`` at its root. An
installed wheel maps them under this package (see ``pyproject.toml``); when running straight from a source tree
(``PYTHONPATH=<repo>``, as on the GPU machines) the repository root is added to this package's search path so
that ``pdserve.engine`` resolves to ``<repo>/engine`` as well.
"""

from __future__ import annotations

import os as _os

_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo_root, "pyproject.toml")) and _os.path.isdir(
    _os.path.join(_repo_root, "engine")
):
    __path__.append(_repo_root)  # type: ignore[name-defined]

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
