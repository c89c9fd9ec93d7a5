"""Suite-wide settings: GPU tests skip without CUDA; the model cache lives under the user's cache folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests import their shared helpers as `tests.helpers...`, so the repository root is on sys.path: last, so that its
# `operator/` and `kernels/` folders never shadow the standard library's `operator` or the PyPI package `kernels`
# (`python -m pytest` puts the working directory first; pyproject.toml says why the root is no import location).
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT] + [str(_ROOT)]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads the variable when a kernel module is
# first imported, so it is set here, before any test module is collected.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every pdserve process a test starts (and the in-process servers) shares one cluster secret, as the pods of one
# InferenceService do (docs/security.md). Tests of a missing or wrong secret pass their own environment.
os.environ.setdefault("PDSERVE_CLUSTER_SECRET", "b64:" + "dGVzdC1jbHVzdGVyLXNlY3JldC0wMTIzNDU2Nzg5YWI=")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
