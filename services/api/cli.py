"""``pdserve serve``: one monolithic engine behind the OpenAI HTTP API (and, with ``--grpc-port``, gRPC).

    pdserve serve --model smollm2-135m-instruct --port 8000 [--grpc-port 50051] [--max-waiting N]

Credentials: ``$PDSERVE_API_KEY`` (or ``--api-key``) for users calling the server directly, and the cluster secret
(``$PDSERVE_CLUSTER_SECRET`` / ``$PDSERVE_CLUSTER_SECRET_FILE``) for calls the router signs. With neither, a
standalone server is open to anyone who can reach its ports (fine on 127.0.0.1; see docs/security.md).

The engine core runs in a child process; this process serves HTTP/gRPC, tokenizes and detokenizes. Ctrl-C or
SIGTERM stops both cleanly; if the engine core dies, the server stops with exit code 1 (a supervisor restarts it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from typing import Any, Callable, Iterator, Mapping, Sequence

from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs
from pdserve.engine.heap import freeze_startup_heap
from pdserve.services.api.reasoning import REASONING_PARSERS

logger = logging.getLogger("pdserve.serve")

API_KEY_ENV = "PDSERVE_API_KEY"
# Bounded by default: a burst queues at most this many sequences, and no request runs for ever.
DEFAULT_MAX_WAITING = 512
DEFAULT_REQUEST_TIMEOUT_S = 600.0


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Front-end flags (shared with the other serving roles)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port")
    g.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: no gRPC server)")
    add_api_key_argument(g, "on /v1, /tokenize, /detokenize and gRPC calls")
    g.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="refuse new requests (429 + Retry-After) while this many sequences wait for their first "
                        f"step (default {DEFAULT_MAX_WAITING}; 0: no limit)")
    add_edge_limit_arguments(g)
    g.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask for")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="also serve /metrics on this port, a listener of its own (default: only the HTTP port)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_chat_arguments(g)
    add_tracing_argument(g)
    if "--kv-events-endpoint" not in parser._option_string_actions:
        g.add_argument("--kv-events-endpoint", default=None,
                       help="ZeroMQ address where the engine publishes KV cache events and load reports for "
                            "routers, e.g. tcp://*:5557 (default: none)")


def add_tracing_argument(group: argparse._ArgumentGroup) -> None:
    """``--otlp-traces-endpoint`` (shared by the serving roles and the router; docs/observability.md)."""
    group.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                       help="export OpenTelemetry spans over OTLP/HTTP to this URL (default: "
                            "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT; none: no export)")


def add_api_key_argument(group: argparse._ArgumentGroup, where: str) -> None:
    """``--api-key``, defaulting to ``$PDSERVE_API_KEY`` (shared by the serving roles and the router)."""
    group.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' {where}. Prefer the environment variable "
                            f"{API_KEY_ENV}: a flag shows up in `ps` to every user of the machine")


def add_edge_limit_arguments(group: argparse._ArgumentGroup) -> None:
    """The limits of the HTTP/gRPC edge (shared by the serving roles and the router); see docs/security.md."""
    group.add_argument("--max-body-bytes", type=int, default=4 << 20,
                       help="largest accepted request body, counted while it streams in (413 beyond it)")
    group.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                       help=f"abort requests running longer than this many seconds (default "
                            f"{DEFAULT_REQUEST_TIMEOUT_S:g}; 0: no limit)")
    group.add_argument("--header-timeout", type=float, default=10.0,
                       help="close connections whose request headers take longer than this many seconds (408; "
                            "0: no limit)")
    group.add_argument("--body-timeout", type=float, default=60.0,
                       help="close connections whose request body takes longer than this many seconds (408; "
                            "0: no limit)")
    group.add_argument("--max-concurrent-rpcs", type=int, default=256,
                       help="gRPC calls served at once; more get RESOURCE_EXHAUSTED (0: no limit)")
    group.add_argument("--max-concurrent-requests", type=int, default=1024,
                       help="HTTP API requests served at once; more get 429 + Retry-After (0: no limit)")
    group.add_argument("--responses-store-size", type=int, default=1024,
                       help="responses kept in memory for /v1/responses' previous_response_id, least recently "
                            "used forgotten first (default 1024; 0: none kept)")


def add_chat_arguments(g: Any) -> None:
    """How chat requests are rendered and answers split (``serve``, the pod roles and the router)."""
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template text) replacing the tokenizer's")
    g.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split chat answers' <think>...</think> into message.reasoning_content (default: off)")


def api_key_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str | None:
    """``--api-key``, else ``$PDSERVE_API_KEY`` (empty: none)."""
    env = os.environ if environ is None else environ
    return args.api_key or env.get(API_KEY_ENV) or None


def check_edge_limits(args: argparse.Namespace) -> None:
    """``ValueError`` for a negative limit (0 means "no limit" for every one but the body size)."""
    if args.max_body_bytes <= 0:
        raise ValueError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    for flag in ("request_timeout", "header_timeout", "body_timeout", "max_concurrent_rpcs", "max_concurrent_requests",
                 "responses_store_size"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (0: no limit), got {getattr(args, flag)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    add_engine_arguments(parser)
    from pdserve.cli.engine_args import positive_int

    parser.add_argument("--data-parallel-size", type=positive_int("data_parallel_size"), default=1,
                        help="engine cores behind this server, each with its own scheduler and KV cache (on CUDA "
                             "core i uses GPU i); new requests go to the least-loaded core")
    g = parser.add_argument_group("runner")
    g.add_argument("--runner", choices=["generate", "pooling"], default="generate",
                   help="generate: completions, chat, responses, messages (default). pooling: /v1/embeddings only "
                        "(prefill-only requests returning the pooled final hidden state)")
    g.add_argument("--pooling-type", choices=["mean", "last", "cls"], default="mean",
                   help="how --runner pooling pools a prompt's final hidden states (after the final norm): their "
                        "mean, the last token's, or the first token's (default mean)")
    g.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="--runner pooling: return the pooled vectors as they are, not L2-normalized")


def settings_from_args(args: argparse.Namespace, served_name: str, cluster_secret: Any = None) -> Any:
    """The server's settings from its flags; ``cluster_secret`` (from :func:`load_cluster_secret`) lets the
    router's signed calls in."""
    from pdserve.services.api.settings import ServerSettings

    check_edge_limits(args)
    return ServerSettings(served_model_names=(served_name,), api_key=api_key_from(args),
                          cluster_secret=cluster_secret, max_body_bytes=args.max_body_bytes,
                          max_tokens_limit=args.max_tokens_limit, request_timeout_s=args.request_timeout,
                          header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                          max_concurrent_rpcs=args.max_concurrent_rpcs,
                          max_concurrent_requests=args.max_concurrent_requests,
                          chat_template=chat_template_from(getattr(args, "chat_template", None)),
                          reasoning_parser=getattr(args, "reasoning_parser", None),
                          responses_store_size=args.responses_store_size)


def chat_template_from(value: str | None) -> str | None:
    """``--chat-template``: the text of a file when it names one, else the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:  # neither a file nor a template: most likely a mistyped path
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def run(args: argparse.Namespace) -> int:
    import asyncio

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """Uvicorn without its own signal handling: it re-raises SIGINT after serving, which would interrupt the
        engine's shutdown; :func:`serve` handles the signals instead."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def request_exit(self) -> None:
            if self.should_exit:  # a second signal: stop without waiting for open connections
                self.force_exit = True
            self.should_exit = True

    return Server


async def serve(args: argparse.Namespace, *, engine_overrides: dict[str, Any] | None = None,
                grpc_services: Sequence[Callable[[Any, Any], None]] = (),
                on_started: Callable[[Any, Any], None] | None = None,
                core_factory: Callable[[Any], Any] | None = None) -> int:
    """Start the engine, then HTTP (and gRPC) until a signal or the engine's death; returns the exit code.

    The disaggregated roles reuse this: ``engine_overrides`` are more :meth:`EngineConfig.create` keywords (role,
    connector), ``grpc_services`` add servicers next to ``Generation`` (see :func:`start_grpc_server`), and
    ``on_started(engine, metrics)`` runs once the engine is up (e.g. to register more metrics).
    ``core_factory`` (picklable, taking the config) replaces the engine core: ``pdserve sim-engine``.
    """
    import asyncio

    from pdserve.engine.async_engine.client import AsyncLLM
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.security import load_cluster_secret
    from pdserve.services.api.app import build_app, with_guard
    from pdserve.services.api.guard import uvicorn_config
    from pdserve.services.api.metrics import ServingMetrics

    try:
        secret = load_cluster_secret()
        settings_from_args(args, "check")  # refuse bad limits before the model loads
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if secret is None:
        logger.warning("no cluster secret (PDSERVE_CLUSTER_SECRET): %s", "calls need the API key" if
                       api_key_from(args) else "this server takes calls from anyone who can reach it")
    kwargs = {**engine_kwargs(args), **(engine_overrides or {})}
    data_parallel = getattr(args, "data_parallel_size", 1)
    if data_parallel > 1:
        kwargs["data_parallel_size"] = data_parallel
    if getattr(args, "kv_events_endpoint", None):
        kwargs["kv_events_endpoint"] = args.kv_events_endpoint
    try:
        config = EngineConfig.create(kwargs.pop("model"), **kwargs)
    except (ValueError, TypeError) as exc:
        logger.error("bad engine configuration: %s", exc)
        return 2
    par = config.parallel
    if getattr(args, "runner", "generate") == "pooling" and (
            par.data_parallel_size * par.tensor_parallel_size * par.pipeline_parallel_size > 1):
        logger.error("bad engine configuration: --runner pooling runs on one device in the server process: "
                     "data, tensor and pipeline parallel sizes must be 1")
        return 2
    name = config.model.served_model_name
    settings = settings_from_args(args, name, secret)
    from pdserve.services.api.tracing import setup_tracing, shutdown_tracing

    try:
        setup_tracing(f"pdserve-{config.kv_transfer.role}", getattr(args, "otlp_traces_endpoint", None))
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 2
    metrics = ServingMetrics(name)
    engine: Any
    if config.parallel.data_parallel_size > 1:
        from pdserve.engine.async_engine.dp_client import DataParallelLLM
        from pdserve.services.api.metrics import CoreMetrics

        cores = CoreMetrics(name, metrics.registry, config.parallel.data_parallel_size)
        try:
            engine = DataParallelLLM(config, stat_loggers=[metrics], max_waiting=args.max_waiting,
                                     core_stat_loggers=[[cores.for_core(i)] for i in range(len(cores))],
                                     core_factory=core_factory)
        except ValueError as exc:
            logger.error("bad engine configuration: %s", exc)
            return 2
    elif getattr(args, "runner", "generate") == "pooling":
        from pdserve.engine.pooling.async_pooler import AsyncPooler

        engine = AsyncPooler(config, args.pooling_type, args.normalize, max_waiting=args.max_waiting)
    else:
        engine = AsyncLLM(config, stat_loggers=[metrics], max_waiting=args.max_waiting, core_factory=core_factory)
    logger.info("starting the engine core for %s (loading the model)", config.model.model)
    try:
        await engine.start()
    except Exception as exc:
        logger.error("the engine failed to start: %s", exc)
        return 1
    if on_started is not None:
        on_started(engine, metrics)
    metrics_listener = None
    if getattr(args, "metrics_port", None) is not None:
        from pdserve.services.api.metrics import MetricsListener

        try:
            metrics_listener = MetricsListener(args.host, args.metrics_port, metrics.registry)
        except OSError as exc:  # e.g. the port is taken
            logger.error("the metrics listener failed to start: %s", exc)
            await engine.shutdown()
            return 1
        logger.info("metrics on http://%s:%d/metrics", args.host, metrics_listener.port)
    app = with_guard(build_app(engine, settings, metrics), settings)
    server = _server_class()(uvicorn_config(app, settings, host=args.host, port=args.port, log_level=args.log_level,
                                            timeout_graceful_shutdown=5))
    grpc_server = None
    if args.grpc_port is not None:
        from pdserve.services.api.grpc_server import start_grpc_server

        try:
            grpc_server = await start_grpc_server(engine, settings, args.host, args.grpc_port, grpc_services)
        except Exception as exc:  # e.g. the port is taken
            logger.error("the gRPC server failed to start: %s", exc)
            if metrics_listener is not None:
                metrics_listener.stop()
            await engine.shutdown()
            return 1
        logger.info("gRPC on %s:%d", args.host, grpc_server.port)

    async def stop_when_engine_dies() -> None:
        while engine.dead_error is None:
            await asyncio.sleep(0.5)
        logger.error("stopping the server: %s", engine.dead_error)
        server.should_exit = True

    watchdog = asyncio.create_task(stop_when_engine_dies())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_exit)
    logger.info("serving %s on http://%s:%d", name, args.host, args.port)
    # Start-up is done: keep full GC passes from stalling every open stream at once (engine/heap.py).
    freeze_startup_heap()
    try:
        await server.serve()
    finally:
        watchdog.cancel()
        if grpc_server is not None:
            await grpc_server.stop(2.0)
        if metrics_listener is not None:
            metrics_listener.stop()
        dead = engine.dead_error is not None
        await engine.shutdown()
        shutdown_tracing()
    return 1 if dead or not server.started else 0
