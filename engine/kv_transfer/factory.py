"""Build an engine's connector from its config and its allocated KV cache (called once by the engine core)."""

from __future__ import annotations

import uuid
from typing import Any

from pdserve.engine.kv_transfer.base import KVConnectorContext
from pdserve.engine.kv_transfer.registry import ConnectorPair, create_connector


def build_connector(config: Any, kv_caches: list[Any]) -> ConnectorPair:
    """Both halves of ``config.kv_transfer.connector``, described by the real cache (dtype, shape, block size).

    The worker half is registered with ``kv_caches`` already. Raises ``ValueError`` for an unknown connector or
    a role that is not ``both``, ``prefill`` or ``decode``.
    """
    from pdserve.engine.core.block_hash import seed_id
    from pdserve.engine.kv_transfer.kv_layout import descriptor_for, model_fingerprint

    kvt, model, cache = config.kv_transfer, config.model, config.cache
    fingerprint = model_fingerprint(model.hf_config, model.model, model.load_format, model.seed)
    descriptor = descriptor_for(kv_caches, model_fingerprint=fingerprint, hash_algo=cache.hash_algo,
                                hash_seed_id=seed_id(cache.hash_seed), tp_rank=0,
                                tp_size=config.parallel.tensor_parallel_size)
    ctx = KVConnectorContext(role=kvt.role, descriptor=descriptor, engine_id=uuid.uuid4().hex[:12],
                             options=dict(kvt.options), hash_seed=cache.hash_seed, cluster_secret=kvt.cluster_secret,
                             redis_password=kvt.redis_password)
    scheduler_half, worker_half = create_connector(kvt.connector, ctx)
    worker_half.register_kv_caches(kv_caches)
    return scheduler_half, worker_half
