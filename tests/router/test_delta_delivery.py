"""Batched token delivery between a router and a pod (``Deltas``, services/api/delta_hub.py and
services/router/delta_mux.py), over real gRPC to a real pod (AsyncLLM on a mock core): once the router's
subscription is open, concurrent sequences' tokens arrive batched on it and equal what the calls' own streams
carry; a subscription lost mid-sequence fails the call (so the runner retries it) and ends the pod's sequence; a
call naming a subscription the pod lacks streams as before; a pod without the method is remembered; a stopping
pod ends idle subscriptions at once."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.api.delta_hub import DELIVERY_METADATA
from pdserve.services.api.settings import ServerSettings
from pdserve.services.router.backend import BackendRequest, GrpcPodBackend, PodError
from pdserve.services.router.types import Endpoint, Role

pytestmark = pytest.mark.timeout(120)


def pod_server(slow: bool = False):
    """A real pod (mock engine core, 20 ms steps when ``slow``) with the gRPC API."""
    from pdserve.engine.async_engine.client import AsyncLLM
    from pdserve.engine.config import EngineConfig
    from tests.helpers.mock_core import make_mock_core, make_slow_mock_core
    from tests.helpers.server_thread import ServerThread

    config = EngineConfig.create("smollm2-135m-instruct", max_model_len=256, num_blocks=256)
    factory = make_slow_mock_core if slow else make_mock_core
    return ServerThread(lambda: AsyncLLM(config, core_factory=factory), ServerSettings(served_model_names=("m",)),
                        grpc=True)


def endpoint(pod) -> Endpoint:
    return Endpoint(name="decode-0", role=Role.DECODE, url="", grpc_target=f"127.0.0.1:{pod.grpc_port}")


def request(i: int, max_tokens: int = 12) -> BackendRequest:
    return BackendRequest(f"r{i}", [5 + i, 6, 7, 8], SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def tokens(backend: GrpcPodBackend, pod: Endpoint, req: BackendRequest) -> tuple[list[int], str | None]:
    ids: list[int] = []
    finish = None
    async for delta in backend.generate(pod, req):
        ids.extend(delta.token_ids)
        finish = delta.finish_reason or finish
    return ids, finish


async def open_subscription(backend: GrpcPodBackend, pod: Endpoint):
    """Make the backend open the pod's subscription (its first call does) and wait until the pod confirms it."""
    await tokens(backend, pod, request(99, 2))
    sub = backend._subscriptions[pod.grpc_target]
    for _ in range(200):
        if sub.ready:
            return sub
        await asyncio.sleep(0.01)
    raise AssertionError("the subscription never opened")


def test_concurrent_sequences_arrive_batched_and_equal_the_plain_streams():
    with pod_server() as pod:
        target = endpoint(pod)

        async def run():
            plain = GrpcPodBackend()
            batched = GrpcPodBackend()
            try:
                # A fresh backend's first calls stream on the call: the subscription is not confirmed yet.
                expected = [await tokens(plain, target, request(i)) for i in range(16)]
                sub = await open_subscription(batched, target)
                items_before = sub.items
                got = await asyncio.gather(*[tokens(batched, target, request(i)) for i in range(16)])
                return expected, got, sub.items - items_before, sub.batches
            finally:
                await plain.close()
                await batched.close()

        expected, got, items, batches = asyncio.run(run())
    assert got == expected
    assert all(len(ids) == 12 and finish == "length" for ids, finish in got)
    # Every response of the 16 calls (tokens and usage) came over the subscription, many in a batch.
    assert items >= 16 * 2
    assert batches < items / 2, (batches, items)


def test_a_lost_subscription_fails_the_call_and_ends_the_pods_sequence():
    with pod_server(slow=True) as pod:
        target = endpoint(pod)

        async def run():
            backend = GrpcPodBackend()
            try:
                sub = await open_subscription(backend, target)
                got: list[int] = []

                async def consume():
                    async for delta in backend.generate(target, request(1, max_tokens=200)):
                        got.extend(delta.token_ids)
                        if len(got) >= 3:
                            asyncio.get_running_loop().create_task(sub.close())

                with pytest.raises(PodError, match="Deltas stream closed"):
                    await consume()
                return got
            finally:
                await backend.close()

        got = asyncio.run(run())
        assert 3 <= len(got) < 200
        deadline = time.monotonic() + 5
        while pod.call(lambda: pod.engine.num_unfinished_requests) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pod.call(lambda: pod.engine.num_unfinished_requests) == 0


def test_a_call_naming_an_unknown_subscription_streams_on_the_call():
    with pod_server() as pod:
        async def run():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{pod.grpc_port}") as channel:
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                         sampling_params=pb.SamplingParams(max_tokens=4, temperature=0.0),
                                         delivery=pb.Delivery(subscriber="gone", key="k"))
                call = pb_grpc.GenerationStub(channel).Generate(req)
                responses = [r async for r in call]
                return responses, await call.initial_metadata()

        responses, metadata = asyncio.run(run())
    assert sum(len(c.token_ids) for r in responses for c in r.choices) == 4
    assert responses[-1].HasField("usage")
    assert DELIVERY_METADATA not in {k for k, _ in metadata or ()}


class _OldPod(pb_grpc.GenerationServicer):
    """A pod from before ``Deltas``: Generate only (two tokens)."""

    async def Generate(self, request, context):
        yield pb.GenerateResponse(choices=[pb.Choice(token_ids=[1])])
        yield pb.GenerateResponse(choices=[pb.Choice(token_ids=[2], finish_reason="length")])


async def call_bare_pod(servicer, name: str, calls: int, pause_s: float) -> tuple[list, set[str]]:
    """``calls`` calls, ``pause_s`` apart, through a fresh backend to a gRPC server with only ``servicer``: their
    results and the targets the backend marked as having no Deltas method."""
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = Endpoint(name=name, role=Role.BOTH, url="", grpc_target=f"127.0.0.1:{port}")
    backend = GrpcPodBackend()
    try:
        results = []
        for i in range(calls):
            results.append(await tokens(backend, target, request(i)))
            await asyncio.sleep(pause_s)
        return results, set(backend._no_deltas)
    finally:
        await backend.close()
        await server.stop(0)


def test_a_pod_without_deltas_is_remembered_and_served_on_its_calls():
    results, no_deltas = asyncio.run(call_bare_pod(_OldPod(), "old-0", 4, 0.05))
    assert results == [([1, 2], "length")] * 4
    assert len(no_deltas) == 1


def test_a_stopping_pod_ends_an_idle_subscription_at_once():
    pod = pod_server().__enter__()
    target = endpoint(pod)

    async def run() -> float:
        backend = GrpcPodBackend()
        try:
            sub = await open_subscription(backend, target)
            start = time.monotonic()
            pod._loop.call_soon_threadsafe(pod._stop.set)  # the pod stops: HTTP first, then gRPC with a 1 s grace
            while not sub.closed and time.monotonic() - start < 10:
                await asyncio.sleep(0.01)
            return time.monotonic() - start
        finally:
            await backend.close()

    try:
        took = asyncio.run(run())
    finally:
        pod.__exit__(None, None, None)
    assert took < 0.9, took  # the idle stream did not hold the server's stop for its grace


class _RefusingPod(_OldPod):
    """A pod that refuses every subscription (as when its RPC limit is reached), counting the attempts."""

    def __init__(self) -> None:
        self.attempts = 0

    async def Deltas(self, request, context):
        self.attempts += 1
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent RPCs")
        yield pb.DeltaBatch()  # never reached: makes this a streaming handler


def test_a_pod_refusing_subscriptions_is_asked_again_after_a_pause_not_per_call():
    pod = _RefusingPod()
    results, _ = asyncio.run(call_bare_pod(pod, "busy-0", 20, 0.02))  # ~0.5 s of calls
    assert results == [([1, 2], "length")] * 20
    assert pod.attempts == 1, pod.attempts


class _Context:
    """What DeltaHub needs of a grpc.aio ServicerContext."""

    async def send_initial_metadata(self, metadata) -> None:
        self.metadata = metadata

    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


def test_a_batch_stops_growing_at_its_byte_limit():
    from pdserve.services.api import delta_hub

    async def run():
        hub = delta_hub.DeltaHub()
        stream = hub.serve(pb.DeltasRequest(subscriber="s"), _Context())
        assert list((await stream.__anext__()).items) == []  # the subscription is open
        # Five 1.5 MB responses (prompt logprobs of long prompts, say) wait at once.
        big = pb.GenerateResponse(choices=[pb.Choice(text="x" * 1_500_000)])

        async def responses():
            for _ in range(5):
                yield big

        async for _ in hub.deliver(pb.GenerateRequest(delivery=pb.Delivery(subscriber="s", key="k")), _Context(),
                                   responses()):
            raise AssertionError("a delivered call yields nothing on its own stream")
        sizes = []
        while sum(sizes) < 5:
            batch = await stream.__anext__()
            assert batch.ByteSize() <= delta_hub.MAX_BATCH_BYTES
            sizes.append(len(batch.items))
        await stream.aclose()
        return sizes

    assert asyncio.run(run()) == [2, 2, 1]
