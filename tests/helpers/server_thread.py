"""Run an API server on a background thread: for tests, examples and benchmarks of the serving stack.

    with ServerThread(lambda: AsyncLLM(config, core_factory=make_mock_core), settings) as srv:
        httpx.get(f"{srv.url}/health")

The engine, the HTTP server (and optionally gRPC) live on the thread's own event loop, so synchronous test code
can call the server like any client would, over a real socket.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Callable

from pdserve.services.api.settings import ServerSettings


class ServerThread:
    """Starts ``engine_factory()`` (an unstarted ``AsyncLLM`` or any EngineClient with ``start``/``shutdown``)
    behind the HTTP app on ``127.0.0.1`` with free ports; ``grpc=True`` adds the gRPC server."""

    def __init__(self, engine_factory: Callable[[], Any], settings: ServerSettings, *, grpc: bool = False,
                 with_metrics: bool = True, startup_timeout_s: float = 300.0) -> None:
        self._factory = engine_factory
        self.settings = settings
        self._grpc = grpc
        self._with_metrics = with_metrics
        self._timeout = startup_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="pdserve-test-server", daemon=True)
        self.engine: Any = None
        self.metrics: Any = None
        self.port = 0
        self.grpc_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError("the test server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's event loop and return its result (e.g. to inspect the engine)."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced to __enter__ if start-up failed
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        import uvicorn

        from pdserve.services.api.app import build_app, with_guard
        from pdserve.services.api.guard import uvicorn_config
        from pdserve.services.api.metrics import ServingMetrics

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.engine = self._factory()
        if self._with_metrics and hasattr(self.engine, "stat_loggers"):
            self.metrics = ServingMetrics(self.settings.model_name)
            self.engine.stat_loggers.append(self.metrics)
        await self.engine.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        app = with_guard(build_app(self.engine, self.settings, self.metrics), self.settings)
        server = uvicorn.Server(uvicorn_config(app, self.settings, log_level="warning"))
        server.capture_signals = _no_signals  # type: ignore[method-assign]  # not the main thread
        grpc_server = None
        if self._grpc:
            from pdserve.services.api.grpc_server import start_grpc_server

            grpc_server = await start_grpc_server(self.engine, self.settings, "127.0.0.1", 0)
            self.grpc_port = grpc_server.port
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.should_exit = True
            await task
            if grpc_server is not None:
                await grpc_server.stop(1.0)
            await self.engine.shutdown()


class _NoSignals:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _no_signals() -> _NoSignals:
    return _NoSignals()
