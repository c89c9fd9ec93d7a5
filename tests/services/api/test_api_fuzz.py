"""Property-based fuzzing of both front ends (issue 11, acceptance 2), bounded in time for CI.

* HTTP: schemathesis generates requests from the app's OpenAPI document (:func:`openapi_schema`: the very models
  the routes validate with), valid and invalid, against a real server with the mock engine core.
* gRPC: hypothesis builds ``GenerateRequest`` / ``TokenizeRequest`` messages with extreme field values, plus raw
  bytes that are no message at all.

The properties: no 5xx but the documented 503/504 (gRPC: no INTERNAL / UNKNOWN), error bodies without Python
exception reprs, and the server answers a good request afterwards.
"""

from __future__ import annotations

import types

import grpc
import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.engine.async_engine.client import AsyncLLM
from tests.helpers.mock_core import make_mock_core
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.api.app import build_app
from pdserve.services.api.openapi import openapi_schema
from pdserve.services.api.settings import ServerSettings
from tests.helpers.server_thread import ServerThread

pytestmark = pytest.mark.timeout(300)

NAME = "mock-model"
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
AUTH_MD = [("authorization", f"Bearer {KEY}")]
SETTINGS = ServerSettings(served_model_names=(NAME,), api_key=KEY, request_timeout_s=10.0, max_tokens_limit=64)
# Documented server-side statuses: 503 (engine not ready / dead) and 504 (request timeout).
ALLOWED_5XX = {503, 504}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def srv(model_config, tokenizer):
    with ServerThread(lambda: AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer), SETTINGS,
                      grpc=True) as server:
        yield server


def _schema_app():
    # The document depends only on the routes; the engine is never called while it is built.
    engine = types.SimpleNamespace(model_name=NAME, max_model_len=256, tokenizer=None)
    return build_app(engine, SETTINGS)  # type: ignore[arg-type]


# schemathesis' own pytest plugin does not run under pytest 9: its hypothesis strategies drive the test instead.
API = schemathesis.openapi.from_dict(openapi_schema(_schema_app()))
OPERATIONS = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/tokenize", "POST"),
              ("/detokenize", "POST"), ("/v1/models", "GET"), ("/health", "GET"), ("/v1/responses", "POST"),
              ("/v1/messages", "POST"), ("/v1/embeddings", "POST"), ("/v1/models/{model_id}", "GET"),
              ("/version", "GET"), ("/reset_prefix_cache", "POST")]


def assert_no_server_fault(status: int, text: str) -> None:
    assert status < 500 or status in ALLOWED_5XX, text[:500]
    assert "Traceback" not in text and "Error(" not in text, text[:500]


def assert_good_request_works(srv) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2},
                   headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text


def test_openapi_document_has_the_request_bodies():
    assert {path for path, _ in OPERATIONS} | {"/metrics"} == set(openapi_schema(_schema_app())["paths"])
    doc = openapi_schema(_schema_app())
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/responses",
                 "/v1/messages", "/v1/embeddings"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]


@pytest.mark.parametrize("path,method", OPERATIONS, ids=[p for p, _ in OPERATIONS])
def test_http_api_fuzz(srv, path, method):
    operation = API[path][method]
    cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                      operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    @FUZZ
    @given(case=cases)
    def run(case):
        response = case.call(base_url=srv.url, headers=AUTH, timeout=30)
        assert_no_server_fault(response.status_code, response.text)
        if response.status_code >= 400 and path == "/v1/messages":  # Anthropic's error shape
            assert response.json()["type"] == "error", response.text
            assert set(response.json()["error"]) == {"type", "message"}, response.text
        elif response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    run()


def test_http_server_survives_the_fuzz(srv):
    assert_good_request_works(srv)


# -- gRPC ----------------------------------------------------------------------------------------------------------

INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
SMALL_INT = st.one_of(st.integers(-5, 300), INT64)
FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
TEXT = st.text(max_size=64)


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    fields = {}
    for name in ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"):
        if draw(st.booleans()):
            fields[name] = draw(SMALL_INT)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if draw(st.booleans()):
            fields[name] = draw(FLOAT)
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        if draw(st.booleans()):
            fields[name] = draw(st.booleans())
    fields["stop"] = draw(st.lists(TEXT, max_size=3))
    fields["stop_token_ids"] = draw(st.lists(SMALL_INT, max_size=3))
    return pb.SamplingParams(**fields)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=draw(st.sampled_from(["", "fuzz"])) + draw(st.text(max_size=8)),
                             model=draw(st.sampled_from(["", NAME, "other"])), user=draw(TEXT),
                             sampling_params=draw(sampling_params()))
    kind = draw(st.sampled_from(["text", "token_ids", "chat", "none"]))
    if kind == "text":
        req.text = draw(TEXT)
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(SMALL_INT, max_size=8)))
    elif kind == "chat":
        for _ in range(draw(st.integers(0, 3))):
            req.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "bogus", ""])),
                                  content=draw(TEXT))
    return req


# gRPC codes a client may legitimately get; INTERNAL and UNKNOWN are server faults.
ALLOWED_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture(scope="module")
def channel(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        yield ch


def _expect_clean(call) -> None:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED_CODES, (exc.code(), exc.details())
        assert "Traceback" not in exc.details() and "Error(" not in exc.details(), exc.details()


@FUZZ
@given(req=generate_requests())
def test_grpc_generate_fuzz(channel, req):
    stub = pb_grpc.GenerationStub(channel)
    _expect_clean(lambda: list(stub.Generate(req, metadata=tuple(AUTH_MD), timeout=30)))


@FUZZ
@given(text=TEXT, model=st.sampled_from(["", NAME, "x"]), special=st.booleans())
def test_grpc_tokenize_fuzz(channel, text, model, special):
    stub = pb_grpc.GenerationStub(channel)
    _expect_clean(lambda: stub.Tokenize(pb.TokenizeRequest(text=text, model=model, add_special_tokens=special),
                                        metadata=tuple(AUTH_MD), timeout=30))


@FUZZ
@given(raw=st.binary(max_size=64))
def test_grpc_raw_bytes_fuzz(channel, raw):
    generate = channel.unary_stream("/pdserve.v1.Generation/Generate")
    tokenize = channel.unary_unary("/pdserve.v1.Generation/Tokenize")
    _expect_clean(lambda: list(generate(raw, metadata=tuple(AUTH_MD), timeout=30)))
    _expect_clean(lambda: tokenize(raw, metadata=tuple(AUTH_MD), timeout=30))


def test_grpc_server_survives_the_fuzz(srv, channel):
    responses = list(pb_grpc.GenerationStub(channel).Generate(
        pb.GenerateRequest(text="Hi", sampling_params=pb.SamplingParams(max_tokens=2)), metadata=tuple(AUTH_MD),
        timeout=30))
    assert responses[-1].HasField("usage")
    assert_good_request_works(srv)


# -- one short run against the real bundled model (the session's `pdserve serve` subprocess) -----------------------

def _cheap(case) -> None:
    """Keep generated requests affordable on a CPU: a few tokens per sequence, few sequences."""
    if isinstance(case.body, dict):
        if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = 4  # a chat's default is the rest of the context: minutes on a CPU
        for field, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2), ("best_of", 2)):
            if isinstance(case.body.get(field), int) and not isinstance(case.body.get(field), bool) \
                    and case.body[field] > cap:
                case.body[field] = cap


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_http_api_fuzz_real_model(real_server, path):
    from api_servers import API_KEY

    operation = API[path]["POST"]
    cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                      operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case):
        _cheap(case)
        response = case.call(base_url=real_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        assert_no_server_fault(response.status_code, response.text)

    run()
    r = httpx.post(f"{real_server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
