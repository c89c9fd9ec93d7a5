"""A gRPC client built from the proto files against ``pdserve serve``: same greedy answers as the offline API,
same validation (as gRPC status codes), standard health checks."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve import SamplingParams
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc

from api_servers import API_KEY, MODEL

pytestmark = pytest.mark.timeout(600)

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of Germany?"}]
AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def channel(real_server):
    with grpc.insecure_channel(real_server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GenerationStub(channel)


def generate(stub, request: pb.GenerateRequest) -> tuple[str, list[pb.GenerateResponse]]:
    responses = list(stub.Generate(request, metadata=AUTH, timeout=300))
    return "".join(c.text for r in responses for c in r.choices), responses


def test_health_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pdserve.v1.Generation"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_model_info_and_tokenize(stub):
    info = stub.GetModelInfo(pb.ModelInfoRequest(), metadata=AUTH)
    assert info.model_name == MODEL and info.max_model_len == 512 and info.vocab_size > 0
    tok = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), metadata=AUTH)
    assert tok.count == len(tok.token_ids) > 0


def test_greedy_generate_equals_offline(stub, offline_llm):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = offline_llm.generate([PROMPT], params)[0].outputs[0]
    text, responses = generate(stub, pb.GenerateRequest(
        text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=8, temperature=0)))
    assert text == want.text
    assert [t for r in responses for c in r.choices for t in c.token_ids] == want.token_ids
    assert responses[-1].usage.completion_tokens == len(want.token_ids)
    assert [c.finish_reason for r in responses for c in r.choices][-1] == want.finish_reason

    ids = offline_llm.get_tokenizer()(PROMPT).input_ids
    text_ids, _ = generate(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                    sampling_params=pb.SamplingParams(max_tokens=8, temperature=0)))
    assert text_ids == want.text

    chat_want = offline_llm.chat(CHAT, params)[0].outputs[0].text
    chat = pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT])
    chat_text, _ = generate(stub, pb.GenerateRequest(chat=chat, sampling_params=pb.SamplingParams(
        max_tokens=8, temperature=0)))
    assert chat_text == chat_want


def test_logprobs_and_n(stub):
    _, responses = generate(stub, pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=3, temperature=0.7, seed=3, n=2, logprobs=2)))
    choices = [c for r in responses for c in r.choices]
    assert {c.index for c in choices} == {0, 1}
    assert all(len(lp.top_logprobs) == 2 for c in choices for lp in c.logprobs)


@pytest.mark.parametrize("request_kwargs,metadata,code", [
    (dict(text=PROMPT, sampling_params=pb.SamplingParams(top_p=5)), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=-1)), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text=PROMPT, sampling_params=pb.SamplingParams(n=99)), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (dict(token_ids=pb.TokenIds(ids=[1] * 600)), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (dict(), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text=PROMPT, model="nope"), AUTH, grpc.StatusCode.NOT_FOUND),
    (dict(text=PROMPT), (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    (dict(text=PROMPT), (), grpc.StatusCode.UNAUTHENTICATED),
], ids=["top_p", "max_tokens", "n", "too long", "no prompt", "unknown model", "bad key", "no key"])
def test_errors_map_to_status_codes(stub, request_kwargs, metadata, code):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**request_kwargs), metadata=metadata, timeout=60))
    assert info.value.code() == code and info.value.details()
    text, _ = generate(stub, pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=1)))
    assert text


def test_client_deadline_aborts_the_request(stub, real_server):
    real_server.wait_idle()
    aborts = real_server.metric("request_success_total", finished_reason="abort")
    request = pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=500, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.Generate(request, metadata=AUTH, timeout=1.0):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    real_server.wait_idle(timeout=30)  # the server cancelled the call and freed the request's blocks
    assert real_server.metric("request_success_total", finished_reason="abort") == aborts + 1
