"""Assembles a running router: tables, plugins, discovery, health checks, KV events, HTTP and gRPC fronts.

:func:`start_router` is what ``pdserve router`` runs; tests call it with a fake pod backend. The HTTP app and
the gRPC service are the monolithic server's own (``services/api``) over a :class:`RouterEngine`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from pdserve.engine.security import ClusterSecret
from pdserve.services.api.metrics import ServingMetrics
from pdserve.services.api.settings import ServerSettings
from pdserve.services.router.anatomy import AnatomyMetrics
from pdserve.services.router.backend import GrpcPodBackend, PodBackend
from pdserve.services.router.engine import SESSION_KEY, ModelInfo, RouterEngine
from pdserve.services.router.hashing import PromptHasher
from pdserve.services.router.health import HealthChecker
from pdserve.services.router.kv_events import KVEventSubscriber
from pdserve.services.router.metrics import RouterMetrics
from pdserve.services.router.routing_config import RoutingSpec, preset
from pdserve.services.router.router import Router, build_router
from pdserve.services.router.sequence import RetryPolicy, SequenceRunner
from pdserve.services.router.state import PodTable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """Everything a router needs, built once by the CLI (or a test). ``discovery`` has ``run(table)``."""

    model: ModelInfo
    settings: ServerSettings
    discovery: Any
    routing: RoutingSpec = field(default_factory=lambda: preset("prefix-load"))
    block_size: int = 16
    hash_seed: int = 0
    hash_algo: str = "sha256"
    retry: RetryPolicy = RetryPolicy()
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    kv_events_live_s: float = 5.0
    session_header: str = "x-session-id"
    access_log: str = "off"  # off | text | json: one pdserve.access line per finished sequence
    # The deployment's secret: signs every call to a pod and releases abandoned KV transfers (None: unsigned calls,
    # leases free abandoned transfers).
    cluster_secret: ClusterSecret | None = field(default=None, compare=False, repr=False)


class SessionMiddleware:
    """Sets the request's session key (a header, else the body's ``user``) for the session-affinity scorer.

    Runs inside the size guard, so the body it buffers is already bounded (and an oversized or stalled body ends
    here with the guard's 413 / 408).
    """

    def __init__(self, app: Any, header: str) -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        key = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == self.header), None)
        if key is None:
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return await self.app(scope, _replay([message]), send)
                chunks.append(message)
                more = message.get("more_body", False)
            key = _user_of(b"".join(m.get("body", b"") for m in chunks))
            receive = _replay(chunks, receive)
        token = SESSION_KEY.set(key or None)
        try:
            await self.app(scope, receive, send)
        finally:
            SESSION_KEY.reset(token)


def _user_of(body: bytes) -> str | None:
    try:
        user = json.loads(body).get("user")
    except (ValueError, AttributeError, RecursionError):
        return None  # the app reports the bad body (a 400)
    return user if isinstance(user, str) and user else None


def _replay(messages: list[dict], then: Callable | None = None) -> Callable:
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


class RunningRouter:
    """A started router; :meth:`stop` tears everything down."""

    def __init__(self, config: RouterConfig, router: Router, engine: RouterEngine, backend: PodBackend,
                 serving_metrics: ServingMetrics, tasks: list[asyncio.Task], events: KVEventSubscriber,
                 health: HealthChecker) -> None:
        self.config, self.router, self.engine, self.backend = config, router, engine, backend
        self.serving_metrics = serving_metrics
        self.events, self.health = events, health
        self._tasks = tasks
        self.http_server: Any = None
        self.grpc_server: Any = None

    @property
    def pods(self) -> PodTable:
        return self.router.pods

    def asgi_app(self) -> Any:
        """The HTTP application: the OpenAI API of ``services/api`` behind the size/key guard."""
        from pdserve.services.api.app import build_app, with_guard

        app = build_app(self.engine, self.config.settings, self.serving_metrics)
        _add_router_routes(app, self)
        return with_guard(SessionMiddleware(app, self.config.session_header), self.config.settings)

    async def serve_http(self, host: str, port: int, log_level: str = "info") -> Any:
        import uvicorn

        from pdserve.services.api.guard import uvicorn_config

        self.http_server = uvicorn.Server(uvicorn_config(self.asgi_app(), self.config.settings, host=host, port=port,
                                                         log_level=log_level, timeout_graceful_shutdown=5))
        return self.http_server

    async def start_grpc(self, host: str, port: int) -> int:
        from pdserve.services.api.grpc_server import start_grpc_server

        self.grpc_server = await start_grpc_server(self.engine, self.config.settings, host, port)
        return self.grpc_server.port

    async def stop(self) -> None:
        await self.engine.shutdown()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.grpc_server is not None:
            await self.grpc_server.stop(2.0)
        await self.events.close()
        await self.backend.close()


def _add_router_routes(app: Any, running: RunningRouter) -> None:
    @app.get("/router/pods")
    async def pods() -> dict[str, Any]:
        """What the router knows about each pod (for operators and tests)."""
        return {"pods": [{"name": p.name, "role": p.role.value, "ready": p.ready, "in_flight": p.in_flight,
                          "grpc": p.endpoint.grpc_target, "http": p.endpoint.url or None,
                          "kv_events": p.endpoint.kv_events,
                          "events_live": p.events_live(),
                          "load": None if p.load is None else {"waiting": p.load.num_waiting,
                                                               "running": p.load.num_running,
                                                               "kv_cache_usage": p.load.kv_cache_usage},
                          "cached_blocks": running.router.deps.prefix.exact.num_blocks(p.name)}
                         for p in running.pods.all()],
                "hashing": running.router.hasher.describe()}


async def start_router(config: RouterConfig, tokenizer: Any, backend: PodBackend | None = None) -> RunningRouter:
    """Build and start the background parts (discovery, health checks, KV events); the caller adds the fronts."""
    serving_metrics = ServingMetrics(config.model.name)
    metrics = RouterMetrics(serving_metrics.registry)
    hasher = PromptHasher(config.block_size, config.hash_seed, config.hash_algo)
    router = build_router(config.routing, hasher, PodTable(), metrics)
    backend = backend or GrpcPodBackend(cluster_secret=config.cluster_secret)
    runner = SequenceRunner(router, backend, config.retry)
    engine = RouterEngine(config.model, tokenizer, runner, stat_loggers=[serving_metrics],
                          anatomy=AnatomyMetrics(serving_metrics.registry), access_log=config.access_log)
    health = HealthChecker(router.pods, backend, config.health_interval_s, config.health_timeout_s,
                           metrics=metrics)
    events = KVEventSubscriber(router.pods, router.deps.prefix, metrics, config.kv_events_live_s)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_keep_running(config.discovery.run, router.pods), name="router-discovery"),
             loop.create_task(health.run(), name="router-health")]
    return RunningRouter(config, router, engine, backend, serving_metrics, tasks, events, health)


async def _keep_running(run: Callable, table: PodTable) -> None:
    """Discovery runs until cancelled (static discovery returns at once: that is fine)."""
    try:
        await run(table)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("pod discovery stopped")
