"""A pod's gRPC server accepts the router's keepalive pings.

The router pings every pod channel every 5 s, with or without a call in flight (services/router/backend.py). Under
grpc's default server policy pings without a call are strikes: the third (~15 s of idle channel) drew a GOAWAY
``too_many_pings``, which failed the calls then in flight and took the pod out of the router's rotation (seen
with ``pdserve up`` in the container image on a busy machine). ``KEEPALIVE_POLICY`` allows those pings.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.services.api.grpc_server import KEEPALIVE_POLICY
from pdserve.services.router.backend import GrpcPodBackend

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
IDLE_S = 17.0  # three of the router's 5 s pings, and a little more


async def quick(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def test_an_idle_router_channel_keeps_its_connection() -> None:
    server = grpc.aio.server(options=KEEPALIVE_POLICY)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Pod", {"Call": grpc.unary_unary_rpc_method_handler(quick)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        # The router's own channel options, keepalive included.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GrpcPodBackend()._options) as channel:
            assert await channel.unary_unary("/test.Pod/Call")(b"", timeout=10) == b"ok"
            await asyncio.sleep(IDLE_S)
            # A GOAWAY would have closed the connection: the channel would be IDLE, not READY.
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            assert await channel.unary_unary("/test.Pod/Call")(b"", timeout=10) == b"ok"
    finally:
        await server.stop(None)
