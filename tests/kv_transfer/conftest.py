"""Fixtures of the KV transfer tests: a real redis-server, a small KV cache shape, connector pairs."""

from __future__ import annotations

import pytest

from pdserve.engine.kv_transfer.block_format import KVDescriptor


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on a free loopback port for the whole session (stopped at the end)."""
    from pdserve.cli.local_servers import LocalRedis

    with LocalRedis() as server:
        yield server.url


@pytest.fixture(autouse=True)
def _shut_down_engines():
    """After each test, shut down the engines it started through ``disagg_helpers.engine`` (their connector threads
    would otherwise keep each engine's weights and KV cache in memory for the rest of the run)."""
    yield
    from disagg_helpers import shut_down_started

    shut_down_started()


@pytest.fixture
def descriptor() -> KVDescriptor:
    return KVDescriptor(model_fingerprint="test-model", dtype="float32", block_size=4, num_layers=3,
                        num_kv_heads=2, head_dim=8, hash_algo="sha256", hash_seed_id=0)
