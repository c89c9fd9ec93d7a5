"""Run an engine in a disaggregated role behind the standard server (HTTP + gRPC) plus the role's gRPC service.

``pdserve prefill`` and ``pdserve decode`` are ``pdserve serve`` with three differences: the engine config gets
the role and the KV connector (``--kv-connector`` and its options), the gRPC server always runs (default port
50051) and also carries ``Prefill`` or ``Decode``, and ``/metrics`` adds the connector's KV transfer metrics.
The OpenAI HTTP API stays available and speaks disaggregation too: a prefill pod's completion responses carry
``kv_transfer_params`` (the handle), and a decode pod given that handle in a request body loads the prompt's KV
instead of computing it; without one it answers the request itself (and with a store connector reuses any
prefix a prefill pod stored).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from pdserve.cli.engine_args import add_engine_arguments
from pdserve.engine.kv_transfer.options import add_kv_transfer_arguments, kv_transfer_kwargs
from pdserve.engine.security import load_cluster_secret

logger = logging.getLogger(__name__)

DEFAULT_GRPC_PORT = 50051


def add_role_arguments(parser: argparse.ArgumentParser) -> None:
    from pdserve.services.api.cli import add_server_arguments

    add_server_arguments(parser)
    add_engine_arguments(parser)
    add_kv_transfer_arguments(parser)
    parser.set_defaults(grpc_port=DEFAULT_GRPC_PORT)


def run_role(args: argparse.Namespace, role: str, add_service: Callable[[Any, Any], None]) -> int:
    """Serve until a signal or the engine's death; returns the exit code (2 for a bad configuration)."""
    import asyncio

    from pdserve.services.api.cli import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = kv_transfer_kwargs(args, role, load_cluster_secret())
    except ValueError as exc:
        logger.error("bad KV transfer configuration: %s", exc)
        return 2
    if args.grpc_port is None:
        args.grpc_port = DEFAULT_GRPC_PORT
    try:
        return asyncio.run(serve(args, engine_overrides=overrides, grpc_services=[add_service],
                                 on_started=add_kv_metrics))
    except KeyboardInterrupt:
        return 130


def add_kv_metrics(engine: Any, metrics: Any) -> None:
    """Export the connector's counters (they arrive with each scheduler snapshot) on the server's registry."""
    from pdserve.engine.kv_transfer.metrics import KVTransferCollector, KVTransferStats

    def latest() -> KVTransferStats | None:
        stats = engine.get_stats()
        raw = getattr(stats, "kv_transfer", None) if stats is not None else None
        return KVTransferStats.from_dict(raw) if raw else None

    metrics.registry.register(KVTransferCollector(latest, metrics.model_name))
