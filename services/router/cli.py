"""``pdserve router``: the front door in front of prefill and decode pods.

    pdserve router --port 8000 --grpc-port 50050 \\
        --prefill grpc://127.0.0.1:50061,events=tcp://127.0.0.1:5561 \\
        --decode  grpc://127.0.0.1:50071,events=tcp://127.0.0.1:5571

    pdserve router --discovery kubernetes --namespace llm \\
        --prefill-selector app=pdserve,role=prefill --decode-selector app=pdserve,role=decode

The block size and the hash seed/algorithm must equal the engines' (they are the prefix index's keys).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from pdserve.engine.core.block_hash import DEFAULT_HASH_ALGO, DEFAULT_HASH_SEED, SUPPORTED_ALGOS
from pdserve.engine.security import ClusterSecret, load_cluster_secret
from pdserve.engine.heap import freeze_startup_heap

logger = logging.getLogger("pdserve.router")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdserve.services.api.cli import (add_api_key_argument, add_chat_arguments, add_edge_limit_arguments,
                                          add_tracing_argument)

    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (OpenAI API)")
    g.add_argument("--grpc-port", type=int, default=None, help="gRPC port (pdserve.v1.Generation; default: none)")
    add_api_key_argument(g, "on /v1, /router, the tokenizer endpoints and gRPC calls")
    add_edge_limit_arguments(g)
    g.add_argument("--metrics-port", type=int, default=None,
                   help="also serve /metrics on this port, a listener of its own (default: only the HTTP port)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--access-log", default="text", choices=["text", "json", "off"],
                   help="one 'pdserve.access' log line per finished request with its phase times (default text)")
    add_tracing_argument(g)
    add_chat_arguments(g)

    m = parser.add_argument_group("model (must match the engines)")
    m.add_argument("--model", default="smollm2-135m-instruct", help="the served model (for its tokenizer)")
    m.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    m.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    m.add_argument("--block-size", type=int, default=16, help="KV block size of the engines")
    m.add_argument("--hash-seed", type=int, default=None,
                   help="block hash seed of the engines (default: derived from the cluster secret when one is set, "
                        f"else {DEFAULT_HASH_SEED}, as the engines do)")
    m.add_argument("--hash-algo", default=DEFAULT_HASH_ALGO, choices=SUPPORTED_ALGOS)

    d = parser.add_argument_group("pods")
    d.add_argument("--discovery", choices=["static", "kubernetes"], default="static")
    d.add_argument("--prefill", nargs="+", default=[], metavar="ADDR",
                   help="static prefill pods: grpc://HOST:PORT[,events=tcp://HOST:PORT][,name=NAME]")
    d.add_argument("--decode", nargs="+", default=[], metavar="ADDR", help="static decode pods (same form)")
    d.add_argument("--both", nargs="+", default=[], metavar="ADDR", help="static monolithic pods (same form)")
    d.add_argument("--namespace", default="default", help="kubernetes: namespace of the pods")
    d.add_argument("--prefill-selector", default="", help="kubernetes: label selector of prefill pods")
    d.add_argument("--decode-selector", default="", help="kubernetes: label selector of decode pods")
    d.add_argument("--both-selector", default="", help="kubernetes: label selector of monolithic pods")
    d.add_argument("--pod-grpc-port", type=int, default=50051, help="kubernetes: pods' gRPC port (or a port "
                   "named 'grpc')")
    d.add_argument("--pod-kv-events-port", type=int, default=5557, help="kubernetes: pods' KV event port (or a "
                   "port named 'kv-events'; 0: none)")

    r = parser.add_argument_group("routing")
    r.add_argument("--routing-config", default=None, metavar="FILE", help="plugins and weights (YAML or JSON)")
    r.add_argument("--routing-preset", default="prefix-load",
                   help="built-in routing when no file is given: prefix-load, load, round-robin, random")
    r.add_argument("--session-header", default="x-session-id", help="header naming a session (else 'user')")
    r.add_argument("--max-attempts", type=int, default=4, help="attempts per request (retries and resumes)")
    r.add_argument("--health-interval", type=float, default=1.0, help="seconds between pod health checks")


def build_config(args: argparse.Namespace, cluster_secret=None):
    """The router's frozen config and the model's tokenizer, from the flags. ``ValueError`` for bad flags.

    ``cluster_secret`` (from :func:`load_cluster_secret`) signs every call to a pod."""
    from pdserve.engine.frontend.fanout import eos_token_id_of
    from pdserve.engine.frontend.tokenizer import load_tokenizer
    from pdserve.engine.model_loader import resolve_model
    from pdserve.services.api.cli import api_key_from, chat_template_from, check_edge_limits
    from pdserve.services.api.settings import ServerSettings
    from pdserve.services.router.discovery import KubernetesDiscovery, PodPorts, StaticDiscovery, static_endpoints
    from pdserve.services.router.engine import ModelInfo
    from pdserve.services.router.routing_config import load_routing_file, preset
    from pdserve.services.router.sequence import RetryPolicy
    from pdserve.services.router.server import RouterConfig
    from pdserve.services.router.types import Role

    if args.block_size <= 0:
        raise ValueError(f"--block-size must be positive, got {args.block_size}")
    check_edge_limits(args)
    # The router reads the model's config and tokenizer, never its weights: a directory served with random
    # weights (`--load-format dummy` on the engines) has none.
    resolved = resolve_model(args.model, "dummy")
    tokenizer = load_tokenizer(resolved.tokenizer_path)
    hf = resolved.hf_config
    max_len = args.max_model_len or getattr(hf, "max_position_embeddings", 2048)
    vocab = int(getattr(hf, "vocab_size", 0) or (len(tokenizer) if tokenizer is not None else 0))
    name = args.served_model_name or args.model
    model = ModelInfo(name, int(max_len), vocab, eos_token_id_of(tokenizer, hf))
    if args.discovery == "static":
        endpoints = static_endpoints(args.prefill, args.decode, args.both)
        if not any(e.role.can_decode() for e in endpoints):
            raise ValueError("give at least one --decode (or --both) pod")
        discovery = StaticDiscovery(endpoints)
    else:
        selectors = {Role.PREFILL: args.prefill_selector, Role.DECODE: args.decode_selector,
                     Role.BOTH: args.both_selector}
        if not (args.decode_selector or args.both_selector):
            raise ValueError("--discovery kubernetes needs --decode-selector (or --both-selector)")
        discovery = KubernetesDiscovery(args.namespace, selectors,
                                        PodPorts(grpc=args.pod_grpc_port, kv_events=args.pod_kv_events_port or None))
    routing = load_routing_file(args.routing_config) if args.routing_config else preset(args.routing_preset)
    # The router's own front takes the API key only: the cluster secret is for calls it makes, not ones it takes.
    settings = ServerSettings(served_model_names=(name,), api_key=api_key_from(args),
                              max_body_bytes=args.max_body_bytes,
                              request_timeout_s=args.request_timeout, header_timeout_s=args.header_timeout,
                              body_timeout_s=args.body_timeout, max_concurrent_rpcs=args.max_concurrent_rpcs,
                              max_concurrent_requests=args.max_concurrent_requests,
                              responses_store_size=args.responses_store_size,
                              chat_template=chat_template_from(args.chat_template),
                              reasoning_parser=args.reasoning_parser)
    config = RouterConfig(model=model, settings=settings, discovery=discovery, routing=routing,
                          block_size=args.block_size, hash_seed=router_hash_seed(args.hash_seed, cluster_secret),
                          hash_algo=args.hash_algo, cluster_secret=cluster_secret,
                          retry=RetryPolicy(max_attempts=args.max_attempts), health_interval_s=args.health_interval,
                          access_log=getattr(args, "access_log", "text"))
    return config, tokenizer


def router_hash_seed(flag: int | None, secret: ClusterSecret | None) -> int:
    """The engines' block-hash seed: ``--hash-seed`` when given, else the cluster secret's (what the engine entry
    points use when a secret is set), else the default."""
    if flag is not None:
        return flag
    return secret.hash_seed() if secret is not None else DEFAULT_HASH_SEED


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        secret = load_cluster_secret()
        if secret is None:
            logger.warning("no cluster secret (PDSERVE_CLUSTER_SECRET): calls to pods are not signed, so only pods "
                           "without one accept them")
        config, tokenizer = build_config(args, secret)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    try:
        return asyncio.run(serve(config, tokenizer, args))
    except KeyboardInterrupt:
        return 130


async def serve(config, tokenizer, args: argparse.Namespace) -> int:
    from pdserve.services.api.tracing import setup_tracing, shutdown_tracing
    from pdserve.services.router.server import start_router

    try:
        setup_tracing("pdserve-router", getattr(args, "otlp_traces_endpoint", None))
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 2

    running = await start_router(config, tokenizer)
    metrics_listener = None
    if args.metrics_port is not None:
        from pdserve.services.api.metrics import MetricsListener

        try:
            metrics_listener = MetricsListener(args.host, args.metrics_port, running.serving_metrics.registry)
        except OSError as exc:  # e.g. the port is taken
            logger.error("the metrics listener failed to start: %s", exc)
            await running.stop()
            return 1
    server = await running.serve_http(args.host, args.port, args.log_level)
    if args.grpc_port is not None:
        port = await running.start_grpc(args.host, args.grpc_port)
        logger.info("gRPC on %s:%d", args.host, port)
    logger.info("router for %s on http://%s:%d (%d pods known so far)", config.model.name, args.host, args.port,
                len(running.pods.all()))
    freeze_startup_heap()  # start-up is done: short GC pauses for every open stream (engine/heap.py)
    try:
        await server.serve()
    finally:
        await running.stop()
        if metrics_listener is not None:
            metrics_listener.stop()
        shutdown_tracing()
    return 0 if server.started else 1
