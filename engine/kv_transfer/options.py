"""Command-line flags of the KV connectors, shared by ``pdserve prefill``, ``pdserve decode`` and ``pdserve up``.

They become the engine config's :class:`~pdserve.engine.config.KVTransferConfig` (``role``, ``connector`` and
``options``, a sorted tuple of pairs so the config stays frozen and hashable).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from pdserve.engine.kv_transfer.base import LOAD_FAILURE_POLICIES
from pdserve.engine.kv_transfer.registry import BUILTIN_CONNECTORS
from pdserve.engine.security import ClusterSecret

REDIS_PASSWORD_ENV = "PDSERVE_REDIS_PASSWORD"


def add_kv_transfer_arguments(parser: argparse.ArgumentParser, default_connector: str | None = "shared-fs") -> None:
    g = parser.add_argument_group("KV transfer")
    g.add_argument("--kv-connector", default=default_connector,
                   help=f"how KV blocks move between pods: {', '.join(BUILTIN_CONNECTORS)} (or package.module:factory)")
    g.add_argument("--kv-path", default=None, help="shared-fs: the directory every pod mounts")
    g.add_argument("--kv-max-bytes", type=int, default=0,
                   help="shared-fs / redis: size cap of the stored blocks, least recently used go first (0: none for "
                        "redis, 16 GiB for shared-fs)")
    g.add_argument("--kv-max-age", type=float, default=3600.0,
                   help="shared-fs: seconds a block file lives unread before the sweep deletes it")
    g.add_argument("--redis-url", default=None,
                   help="redis: the server, e.g. redis://redis:6379/0 (rediss:// for TLS); no password in it: "
                        f"the password comes from the environment variable {REDIS_PASSWORD_ENV}")
    g.add_argument("--redis-ttl", type=int, default=3600, help="redis: seconds a block lives unread")
    g.add_argument("--kv-port", type=int, default=0, help="grpc: port of this prefill pod's KV server (0: any); with "
                   "tensor parallelism rank r's server listens on this port + r")
    g.add_argument("--kv-advertise-host", default="127.0.0.1",
                   help="grpc: the address decode pods reach this pod's KV server at (a pod's IP)")
    g.add_argument("--kv-lease", type=float, default=60.0,
                   help="grpc: seconds a prefill pod keeps a finished prompt's blocks for a decode pod")
    g.add_argument("--kv-transport", default="auto", choices=["auto", "stream", "ipc"],
                   help="grpc: how a decode pod moves the blocks: device to device over CUDA IPC when the prefill "
                        "pod is on the same node (ipc), over the gRPC stream (stream), or IPC where possible (auto)")
    g.add_argument("--kv-load-timeout", type=float, default=10.0,
                   help="seconds a decode pod waits for blocks still being written, and the deadline of a pull")
    g.add_argument("--kv-load-failure-policy", default="recompute", choices=list(LOAD_FAILURE_POLICIES),
                   help="when KV cannot be loaded (missing, corrupt, incompatible, peer down): compute it here "
                        "(recompute) or fail the request (fail)")


def kv_transfer_kwargs(args: argparse.Namespace, role: str, cluster_secret: ClusterSecret | None = None,
                       environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``EngineConfig.create`` keyword arguments (``role``, ``connector``, ``options``, ``cluster_secret``,
    ``redis_password``) for an engine role; ``cluster_secret`` is what the entry point loaded
    (``load_cluster_secret()``), the Redis password comes from ``PDSERVE_REDIS_PASSWORD`` in ``environ``."""
    connector = getattr(args, "kv_connector", None)
    if connector == "shared-fs" and not args.kv_path:
        raise ValueError("--kv-connector shared-fs needs --kv-path (a directory shared by prefill and decode pods)")
    if connector == "redis" and not args.redis_url:
        raise ValueError("--kv-connector redis needs --redis-url")
    if args.redis_url:
        from pdserve.engine.kv_transfer.stores.redis_store import check_redis_url

        check_redis_url(args.redis_url)
    options = {
        "load_failure_policy": args.kv_load_failure_policy, "kv_load_timeout_s": args.kv_load_timeout,
        "kv_path": args.kv_path, "kv_max_bytes": args.kv_max_bytes,
        "kv_max_age_s": getattr(args, "kv_max_age", None), "redis_url": args.redis_url,
        "redis_ttl_s": args.redis_ttl, "kv_port": args.kv_port, "kv_advertise_host": args.kv_advertise_host,
        "kv_lease_s": args.kv_lease, "kv_transport": getattr(args, "kv_transport", None),
    }
    env = os.environ if environ is None else environ
    delay = fault_write_delay(env, connector)
    if delay:
        options["fault_write_delay_s"] = delay
    return {"role": role, "connector": connector, "cluster_secret": cluster_secret,
            "redis_password": env.get(REDIS_PASSWORD_ENV) or None,
            "options": tuple(sorted((k, v) for k, v in options.items() if v is not None))}


# Fault injection for tests and drills (docs/observability.md): every block the shared-fs connector writes waits
# this many seconds first, as a slow shared volume would. Never set it in production.
FAULT_WRITE_DELAY_ENV = "PDSERVE_FAULT_KV_WRITE_DELAY_S"


def fault_write_delay(environ: Mapping[str, str], connector: str | None) -> float:
    """The injected per-block write delay (0 when unset); ``ValueError`` for a bad value or another connector."""
    raw = environ.get(FAULT_WRITE_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        delay = float(raw)
    except ValueError:
        raise ValueError(f"{FAULT_WRITE_DELAY_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0 <= delay <= 60:
        raise ValueError(f"{FAULT_WRITE_DELAY_ENV} must be in [0, 60] seconds, got {delay}")
    if delay and connector != "shared-fs":
        raise ValueError(f"{FAULT_WRITE_DELAY_ENV} (fault injection) works only with the shared-fs connector, "
                         f"not {connector!r}")
    return delay
