"""Fixtures shared by the speculative-decoding engine tests: one torch thread, tiny random Llama / Qwen3 models."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one thread is many times faster than several fighting for two cores. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> str:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))
