"""The router's network edge (issue 11): its HTTP front over real sockets, its signed calls to real gRPC pods, and
how fast a restarted pod rejoins the rotation."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from router_fakes import FakePodBackend, WordTokenizer

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.security import ClusterSecret
from pdserve.services.api.settings import ServerSettings
from pdserve.services.router.backend import BackendRequest, GrpcPodBackend, PodRejected
from pdserve.services.router.discovery import StaticDiscovery, static_endpoints
from pdserve.services.router.engine import ModelInfo
from pdserve.services.router.routing_config import preset
from pdserve.services.router.server import RouterConfig, start_router
from pdserve.services.router.types import Endpoint, Role

pytestmark = pytest.mark.timeout(120)

KEY = "router-key"


def free_port() -> int:
    from pdserve.cli.local_servers import free_port

    return free_port()


async def serve_router(settings: ServerSettings):
    """A router over fake pods, its HTTP front on a real port (uvicorn, as ``pdserve router`` runs it)."""
    pods = static_endpoints([], ["127.0.0.1:7100"])
    config = RouterConfig(model=ModelInfo("fake", 512, 1000, 2), settings=settings, discovery=StaticDiscovery(pods),
                          routing=preset("round-robin"), block_size=4, health_interval_s=0.05)
    running = await start_router(config, WordTokenizer(), FakePodBackend())
    port = free_port()
    server = await running.serve_http("127.0.0.1", port, "warning")
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    return running, server, task, f"http://127.0.0.1:{port}"


async def stop_router(running, server, task) -> None:
    server.should_exit = True
    await task
    await running.stop()


def raw_exchange(url: str, head: bytes, chunks, limit_s: float = 20.0) -> tuple[bytes, float]:
    """Send ``head`` and then ``chunks`` until the server answers or closes; what it sent, and when."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=limit_s) as s:
        s.sendall(head)
        data = b""
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break  # the server answered before the body ended
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        while True:
            try:
                more = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not more:
                break
            data += more
    return data, time.monotonic() - start


async def test_router_front_refuses_bad_bodies_with_json_errors():
    settings = ServerSettings(served_model_names=("fake",), api_key=KEY, max_body_bytes=4 << 20,
                              body_timeout_s=2.0)
    running, server, task, url = await serve_router(settings)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=30) as client:
            # JSON nested 10,000 levels: the session-key middleware parsed it first and answered a plain-text 500.
            nested = b'{"model": "fake", "prompt": [5], "x": ' + b"[" * 10000 + b"]" * 10000 + b"}"
            r = await client.post("/v1/completions", content=nested, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text
            # /router/pods names every pod and its address: only for holders of the key.
            assert (await client.get("/router/pods")).status_code == 200
            assert (await client.get("/router/pods", headers={"Authorization": "Bearer nope"})).status_code == 401
            good = await client.post("/v1/completions", json={"model": "fake", "prompt": [5, 6], "max_tokens": 3})
            assert good.status_code == 200, good.text

        # A 50 MB chunked body: refused with a JSON 413 while it streams (it was a plain-text 500 after buffering).
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer " + KEY.encode()
                + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * (1 << 20)
        chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 50 + [b"0\r\n\r\n"]
        data, took = await asyncio.to_thread(raw_exchange, url, head, chunks)
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        assert b"request_too_large" in data and b"application/json" in data
        # A body that stops is closed with a 408 after the body deadline.
        head = head.replace(b"Transfer-Encoding: chunked", b"Content-Length: 100")
        data, took = await asyncio.to_thread(raw_exchange, url, head, [b'{"model":'])
        assert data.startswith(b"HTTP/1.1 408") and 1.5 < took < 6, (data[:200], took)
    finally:
        await stop_router(running, server, task)


def pod_server(secret: ClusterSecret | None):
    """A real pod (mock engine core) with the gRPC API, holding ``secret``."""
    from pdserve.engine.async_engine.client import AsyncLLM
    from tests.helpers.mock_core import make_mock_core
    from pdserve.engine.config import EngineConfig
    from tests.helpers.server_thread import ServerThread

    config = EngineConfig.create("smollm2-135m-instruct", max_model_len=256, num_blocks=64)
    return ServerThread(lambda: AsyncLLM(config, core_factory=make_mock_core),
                        ServerSettings(served_model_names=("m",), cluster_secret=secret), grpc=True)


def test_router_signs_its_calls_to_pods():
    secret = ClusterSecret.generate()
    with pod_server(secret) as pod:
        endpoint = Endpoint(name="decode-0", role=Role.DECODE, url="", grpc_target=f"127.0.0.1:{pod.grpc_port}")
        req = BackendRequest("r1", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))

        async def generate(backend: GrpcPodBackend) -> list[int]:
            try:
                return [t for delta in [d async for d in backend.generate(endpoint, req)] for t in delta.token_ids]
            finally:
                await backend.close()

        assert len(asyncio.run(generate(GrpcPodBackend(cluster_secret=secret)))) == 3
        for wrong in (None, ClusterSecret.generate()):  # unsigned, or another deployment's router
            with pytest.raises(PodRejected) as info:
                asyncio.run(generate(GrpcPodBackend(cluster_secret=wrong)))
            assert info.value.status == 401


async def _health_server(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server


async def test_restarted_pod_rejoins_within_two_seconds():
    """The channel's reconnect backoff grew while the pod was down (grpc's default reaches 120 s), so a pod back
    after ~20 s failed its health checks for 7-26 s more. Now it passes within about a second."""
    port = free_port()
    endpoint = Endpoint(name="decode-0", role=Role.DECODE, url="", grpc_target=f"127.0.0.1:{port}")
    backend = GrpcPodBackend()
    server = await _health_server(port)
    try:
        assert await backend.check_health(endpoint, 1.0)
        await server.stop(0)
        down_until = time.monotonic() + 20
        while time.monotonic() < down_until:  # the router probes the dead pod every second
            assert not await backend.check_health(endpoint, 1.0)
            await asyncio.sleep(1.0)
        server = await _health_server(port)
        healthy_at = time.monotonic()
        while not await backend.check_health(endpoint, 1.0):
            await asyncio.sleep(0.2)
            assert time.monotonic() - healthy_at < 2.5, "the restarted pod is still out of rotation"
    finally:
        await server.stop(0)
        await backend.close()


async def test_client_chosen_ids_are_logged_escaped(caplog):
    """A request id is the client's string (gRPC ``request_id``); written raw, a newline in it forges log lines."""
    import logging

    settings = ServerSettings(served_model_names=("fake",))
    backend = FakePodBackend(refuse_first_stream=True)  # the first attempt fails: the router logs the sequence
    pods = static_endpoints([], ["127.0.0.1:7100", "127.0.0.1:7101"])
    config = RouterConfig(model=ModelInfo("fake", 512, 1000, 2), settings=settings, discovery=StaticDiscovery(pods),
                          routing=preset("round-robin"), block_size=4, health_interval_s=0.05)
    running = await start_router(config, WordTokenizer(), backend)
    try:
        for _ in range(200):
            if len([p for p in running.pods.all() if p.ready]) == 2:
                break
            await asyncio.sleep(0.01)
        evil = "r1\n2026-01-01 00:00:00 INFO forged: admin logged in"
        with caplog.at_level(logging.WARNING, logger="pdserve.services.router"):
            stream = running.engine.generate([5, 6], SamplingParams(max_tokens=2, temperature=0.0), request_id=evil)
            async for _ in stream:
                pass
        lines = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
        assert lines and all("\n" not in line for line in lines), lines
    finally:
        await running.stop()
