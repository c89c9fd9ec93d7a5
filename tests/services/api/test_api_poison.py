"""Issue 11's poisonous requests at the HTTP and gRPC APIs: each is a 400 / INVALID_ARGUMENT naming the field
(some were 500s, some reached the engine and killed it), and the next good request is served.

The real app and gRPC server over ``AsyncLLM`` (model-free core, the bundled model's tokenizer and vocabulary).
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from pdserve.engine.async_engine.client import AsyncLLM
from tests.helpers.mock_core import make_mock_core
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.api.app import build_app
from pdserve.services.api.grpc_server import start_grpc_server
from pdserve.services.api.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)

NAME = "mock-model"


async def post(client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes a lone surrogate as "\\ud800" (valid JSON, as a client would send it); httpx's own
    # encoder would refuse to encode it.
    return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

POISON = [  # (id, body fields, param the 400 names)
    ("stop-token-beyond-vocab", {"stop_token_ids": [1_000_000_000], "min_tokens": 1}, "stop_token_ids"),
    ("top-k-beyond-int64", {"top_k": 2 ** 63}, "top_k"),
    ("top-k-max-uint64", {"top_k": 2 ** 64 - 1}, "top_k"),
    ("seed-2-64", {"seed": 2 ** 64}, "seed"),
    ("too-many-stop-ids", {"stop_token_ids": list(range(300))}, "stop_token_ids"),
    ("lone-surrogate-prompt", {"prompt": "hello \ud800 world"}, "prompt"),
    ("lone-surrogate-stop", {"stop": ["\udfff"]}, "stop"),
    ("lone-surrogate-salt", {"cache_salt": "a\ud800"}, "cache_salt"),
]


@pytest.fixture
async def engine(model_config, tokenizer):
    async with AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer) as llm:
        yield llm


@pytest.mark.parametrize("fields, param", [c[1:] for c in POISON], ids=[c[0] for c in POISON])
async def test_http_refuses_poison_with_400(engine, fields, param):
    app = build_app(engine, ServerSettings(served_model_names=(NAME,)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        r = await post(client, "/v1/completions", {"model": NAME, "prompt": "Hello", "max_tokens": 3, **fields})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert engine.num_unfinished_requests == 0
        ok = await client.post("/v1/completions", json={"model": NAME, "prompt": "Hello", "max_tokens": 3})
        assert ok.status_code == 200, ok.text


async def test_chat_with_a_lone_surrogate_is_400(engine):
    app = build_app(engine, ServerSettings(served_model_names=(NAME,)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        r = await post(client, "/v1/chat/completions", {
            "model": NAME, "messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


GRPC_POISON = [
    ("stop-token-beyond-vocab", pb.SamplingParams(stop_token_ids=[1_000_000_000], min_tokens=1, max_tokens=3)),
    ("negative-top-k", pb.SamplingParams(top_k=-5, max_tokens=3)),
    ("too-many-stop-ids", pb.SamplingParams(stop_token_ids=list(range(300)), max_tokens=3)),
]


@pytest.mark.parametrize("params", [c[1] for c in GRPC_POISON], ids=[c[0] for c in GRPC_POISON])
async def test_grpc_refuses_poison_with_invalid_argument(engine, params):
    server = await start_grpc_server(engine, ServerSettings(served_model_names=(NAME,)), "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(pb.GenerateRequest(text="Hello", sampling_params=params)):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            good = [r async for r in stub.Generate(pb.GenerateRequest(
                text="Hello", sampling_params=pb.SamplingParams(max_tokens=2)))]
            assert sum(len(c.token_ids) for r in good for c in r.choices) == 2
    finally:
        await server.stop(0)
