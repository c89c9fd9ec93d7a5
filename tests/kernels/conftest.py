"""Kernel tests run on a GPU when there is one, else on CPU through Triton's interpreter.

The interpreter is switched on here, before any test module imports ``pdserve.kernels`` (Triton reads
``TRITON_INTERPRET`` when a kernel is decorated). A suite that imports the kernels earlier must set the variable
itself.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
