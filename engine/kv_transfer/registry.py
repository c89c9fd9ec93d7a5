"""Connectors by name: the engine config's ``kv_transfer.connector`` string picks one.

Built-in names map to factories imported only when used (the redis client, grpc). A third-party connector is
named by its import path, ``"package.module:factory"``; the factory takes a :class:`KVConnectorContext` and returns
the ``(scheduler half, worker half)`` pair. No registration step, hence no global mutable registry.

Options every built-in connector reads (``KVTransferConfig.options``; CLI flags in parentheses)::

    load_failure_policy   recompute | fail                   (--kv-load-failure-policy)
    kv_load_timeout_s     wait for blocks being written / a pull's deadline (--kv-load-timeout)
    kv_path, kv_max_bytes, kv_max_age_s             shared-fs (--kv-path, --kv-max-bytes, --kv-max-age)
    redis_url, redis_ttl_s, kv_max_bytes            redis     (--redis-url, --redis-ttl, --kv-max-bytes)
    kv_host, kv_port, kv_advertise_host, kv_lease_s grpc      (--kv-port, --kv-advertise-host, --kv-lease)
    kv_transport          auto | stream | ipc        grpc      (--kv-transport)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pdserve.engine.kv_transfer.base import KVConnectorContext, KVConnectorScheduler, KVConnectorWorker
from pdserve.engine.kv_transfer.metrics import KVTransferStats

ConnectorPair = tuple[KVConnectorScheduler, KVConnectorWorker]

BUILTIN_CONNECTORS: dict[str, str] = {
    "shared-fs": "pdserve.engine.kv_transfer.registry:_shared_fs",
    "redis": "pdserve.engine.kv_transfer.registry:_redis",
    "grpc": "pdserve.engine.kv_transfer.registry:_grpc",
}


def create_connector(name: str, ctx: KVConnectorContext) -> ConnectorPair:
    """Build both halves of connector ``name`` (a built-in name or ``"module:factory"``)."""
    return resolve_factory(name)(ctx)


def resolve_factory(name: str) -> Callable[[KVConnectorContext], ConnectorPair]:
    target = BUILTIN_CONNECTORS.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown KV connector {name!r}; built-in connectors: "
                         f"{', '.join(BUILTIN_CONNECTORS)} (or give 'package.module:factory')")
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load KV connector {name!r}: {exc}") from exc
    return factory


def _store_pair(ctx: KVConnectorContext, name: str, open_namespace: Callable[[str], Any]) -> ConnectorPair:
    from pdserve.engine.kv_transfer.stores.worker import StoreConnectorWorker

    sched = _store_scheduler(ctx, name, open_namespace, KVTransferStats(connector=name))
    return sched, StoreConnectorWorker(ctx, sched.stats, sched.store, open_namespace)


def _store_scheduler(ctx: KVConnectorContext, name: str, open_namespace: Callable[[str], Any],
                     stats: KVTransferStats) -> Any:
    if ctx.cluster_secret is None:
        raise ValueError(f"the {name} KV connector signs and checks every stored block with the cluster secret: "
                         f"set PDSERVE_CLUSTER_SECRET or PDSERVE_CLUSTER_SECRET_FILE (the same on every pod)")
    from pdserve.engine.kv_transfer.stores.scheduler import StoreConnectorScheduler

    return StoreConnectorScheduler(ctx, name, stats, open_namespace(ctx.descriptor.namespace), open_namespace)


def _shared_fs_opener(ctx: KVConnectorContext) -> Callable[[str], Any]:
    from pdserve.engine.kv_transfer.stores.shared_fs import DEFAULT_MAX_AGE_S, SharedFSStore

    # The largest block object: a full block's payload plus its header (a few hundred bytes; 64 KiB of room).
    max_object = ctx.descriptor.payload_bytes() * ctx.kv_heads // ctx.descriptor.num_kv_heads + (64 << 10)
    return lambda namespace: SharedFSStore(
        ctx.option("kv_path", ""), namespace, int(ctx.option("kv_max_bytes", 0)),
        float(ctx.option("kv_max_age_s", DEFAULT_MAX_AGE_S)), max_object,
        fault_write_delay_s=float(ctx.option("fault_write_delay_s", 0.0)))


def _redis_opener(ctx: KVConnectorContext) -> Callable[[str], Any]:
    from pdserve.engine.kv_transfer.stores.redis_store import RedisStore

    return lambda namespace: RedisStore(ctx.option("redis_url", ""), namespace, int(ctx.option("redis_ttl_s", 3600)),
                                        int(ctx.option("kv_max_bytes", 0)),
                                        float(ctx.option("redis_timeout_s", 2.0)), password=ctx.redis_password)


def _shared_fs(ctx: KVConnectorContext) -> ConnectorPair:
    return _store_pair(ctx, "shared-fs", _shared_fs_opener(ctx))


def _redis(ctx: KVConnectorContext) -> ConnectorPair:
    return _store_pair(ctx, "redis", _redis_opener(ctx))


def create_scheduler_half(name: str, ctx: KVConnectorContext, kv_servers: list[str | None],
                          stats: KVTransferStats) -> KVConnectorScheduler:
    """The scheduler half alone, for an engine whose worker halves run in its tensor-parallel worker processes
    (``kv_servers``: each rank's KV server address, grpc; the handle names them all, in rank order). Built-in
    connectors only."""
    if name in ("shared-fs", "redis"):
        opener = _shared_fs_opener(ctx) if name == "shared-fs" else _redis_opener(ctx)
        return _store_scheduler(ctx, name, opener, stats)
    if name == "grpc":
        from pdserve.engine.kv_transfer.grpc.scheduler import GrpcConnectorScheduler

        address = ",".join(a or "" for a in kv_servers) if any(kv_servers) else None
        return GrpcConnectorScheduler(ctx, stats, address)
    raise ValueError(f"the KV connector {name!r} cannot run with tensor_parallel_size > 1: only the built-in "
                     f"connectors ({', '.join(BUILTIN_CONNECTORS)}) save and load per rank")


def _grpc(ctx: KVConnectorContext) -> ConnectorPair:
    from pdserve.engine.kv_transfer.grpc.scheduler import GrpcConnectorScheduler
    from pdserve.engine.kv_transfer.grpc.worker import GrpcConnectorWorker

    stats = KVTransferStats(connector="grpc")
    worker = GrpcConnectorWorker(ctx, stats)
    return GrpcConnectorScheduler(ctx, stats, worker.address), worker
