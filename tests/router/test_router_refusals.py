"""Issue 11: a request a pod refuses (or its engine failed on) is not retried on other pods; the router's
``generate`` takes the API's ``kv_transfer_params`` argument (it answered 500) and refuses it with a 400;
``cache_salt`` reaches the pods and the router's prefix hashes.

The pods here are real gRPC servers that refuse every ``Generate`` with one status code (as a pod whose engine
aborted the request answers), behind the router's real gRPC backend, retry logic and HTTP app.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from router_fakes import FakePodBackend, WordTokenizer
from test_router_flow import config, started

from pdserve.engine.frontend.params_wire import sampling_from_pb, sampling_to_pb
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.router.server import start_router

pytestmark = pytest.mark.timeout(60)


class RefusingPod(pb_grpc.GenerationServicer):
    """Answers every ``Generate`` with ``code``; counts the calls."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        await context.abort(self.code, "the engine failed on this request: IndexError: index out of range")
        yield  # unreachable: makes this a server-streaming handler


async def start_pods(code: grpc.StatusCode, count: int):
    pods, servers = [], []
    for _ in range(count):
        server = grpc.aio.server()
        pod = RefusingPod(code)
        pb_grpc.add_GenerationServicer_to_server(pod, server)
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        pods.append((pod, port))
        servers.append(server)
    return pods, servers


async def router_over(ports: list[int]):
    import dataclasses

    from pdserve.services.router.discovery import StaticDiscovery, static_endpoints

    cfg = config(prefill=0, decode=len(ports))
    cfg = dataclasses.replace(cfg, discovery=StaticDiscovery(static_endpoints([], [f"127.0.0.1:{p}" for p in ports])))
    running = await start_router(cfg, WordTokenizer())
    for _ in range(300):
        if len([p for p in running.pods.all() if p.ready]) == len(ports):
            break
        await asyncio.sleep(0.02)
    return running


@pytest.mark.parametrize("code, status", [(grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.UNKNOWN, 500),
                                          (grpc.StatusCode.INVALID_ARGUMENT, 400)])
async def test_a_refused_request_is_not_retried_on_other_pods(code, status):
    pods, servers = await start_pods(code, 3)
    running = await router_over([port for _, port in pods])
    try:
        transport = httpx.ASGITransport(app=running.asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            r = await client.post("/v1/completions", json={"model": "fake", "prompt": [5, 6, 7], "n": 16,
                                                           "max_tokens": 4})
        assert r.status_code == status, r.text
        # Before, INTERNAL and UNKNOWN were retried on every other pod (4 attempts for each of the 16 sequences):
        # one bad request reached every pod. Now each sequence tries once, and the first refusal ends them all.
        calls = [pod.calls for pod, _ in pods]
        assert sum(calls) <= 16, calls
        assert running.router.metrics.retries.labels("decode")._value.get() == 0
    finally:
        await running.stop()
        for server in servers:
            await server.stop(0)


async def test_kv_transfer_params_at_the_router_is_a_clear_400():
    backend = FakePodBackend()
    running = await started(backend, prefill=0)
    try:
        transport = httpx.ASGITransport(app=running.asgi_app())
        handle = {"transfer_id": "t", "kv_server": "10.0.0.9:50055", "block_hashes": [], "num_tokens": 3}
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            r = await client.post("/v1/completions", json={"model": "fake", "prompt": [5, 6, 7], "max_tokens": 2,
                                                           "kv_transfer_params": handle})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "kv_transfer_params"
        assert backend.calls == []
    finally:
        await running.stop()


async def test_cache_salt_reaches_the_pod_and_the_prefix_hashes():
    backend = FakePodBackend()
    running = await started(backend, prefill=0)
    try:
        transport = httpx.ASGITransport(app=running.asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            r = await client.post("/v1/completions", json={"model": "fake", "prompt": list(range(100, 140)),
                                                           "max_tokens": 2, "cache_salt": "tenant-a"})
        assert r.status_code == 200, r.text
        (_, _, req), = [c for c in backend.calls if c[0] == "generate"]
        assert req.params.cache_salt == "tenant-a"
        router = running.router
        prompt = list(range(100, 140))
        salted = router.context("x", prompt, cache_salt="tenant-a").block_hashes
        assert salted == router.hasher.hash_prompt(prompt, "tenant-a")
        assert salted != router.context("x", prompt).block_hashes
        assert salted != router.context("x", prompt, cache_salt="tenant-b").block_hashes
        assert len(salted) == 10  # 40 tokens, blocks of 4
    finally:
        await running.stop()


def test_sampling_params_round_trip_through_protobuf():
    params = SamplingParams(n=1, temperature=0.5, top_k=7, seed=-3, stop=["x"], stop_token_ids=[4, 5],
                            max_tokens=9, min_tokens=2, logprobs=3, cache_salt="s")
    assert sampling_from_pb(sampling_to_pb(params)) == params
    assert sampling_from_pb(sampling_to_pb(SamplingParams())) == SamplingParams()
