"""Fixtures of the API tests: one real ``pdserve serve`` per session (loading the model is the slow part), the
offline LLM with the same engine settings, and the model's config for mock-core servers."""

from __future__ import annotations

import pytest

from api_servers import ENGINE_KWARGS, MODEL, start_real_server, stop_real_server


@pytest.fixture(scope="session")
def real_server():
    server = start_real_server()
    try:
        yield server
    finally:
        stop_real_server(server)


@pytest.fixture(scope="session")
def offline_llm():
    """The offline API with the server's engine settings (greedy answers must match the server's)."""
    from pdserve import LLM

    return LLM(model=MODEL, **ENGINE_KWARGS)


@pytest.fixture(scope="session")
def model_config():
    """The bundled model's config, small: mock-core servers use its tokenizer and vocabulary."""
    from pdserve.engine.config import EngineConfig

    return EngineConfig.create(MODEL, max_model_len=256, num_blocks=64)


@pytest.fixture(scope="session")
def tokenizer(model_config):
    """Loaded once and shared by the mock-core servers."""
    from pdserve.engine.frontend.tokenizer import load_tokenizer

    return load_tokenizer(model_config.model.tokenizer_path)
