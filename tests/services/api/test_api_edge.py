"""The network edge of a pod (issue 11): credentials, input limits and read deadlines, over real sockets.

One mock-core server with a cluster secret, an API key and short deadlines serves every test; raw sockets send
what HTTP clients refuse to (a body that stops, headers that never end, conflicting framing).
"""

from __future__ import annotations

import json
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.engine.async_engine.client import AsyncLLM
from tests.helpers.mock_core import make_mock_core
from pdserve.engine.security import AUTH_HEADER, ClusterSecret
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.api.auth import ENGINE_SCOPE
from pdserve.services.api.settings import ServerSettings
from tests.helpers.server_thread import ServerThread

pytestmark = pytest.mark.timeout(120)

NAME = "mock-model"
KEY = "edge-test-key"
SECRET = ClusterSecret.generate()
OTHER_SECRET = ClusterSecret.generate()
MAX_BODY = 64 << 10
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def srv(model_config, tokenizer):
    settings = ServerSettings(served_model_names=(NAME,), api_key=KEY, cluster_secret=SECRET,
                              max_body_bytes=MAX_BODY, header_timeout_s=HEADER_TIMEOUT_S,
                              body_timeout_s=BODY_TIMEOUT_S)
    with ServerThread(lambda: AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer), settings,
                      grpc=True) as server:
        yield server


def key_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def body(**kw) -> dict:
    return {"model": NAME, "prompt": "Hello there", "max_tokens": 3, **kw}


def assert_good_request_works(srv) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", json=body(), headers=key_headers(), timeout=30)
    assert r.status_code == 200, r.text


# -- credentials ---------------------------------------------------------------------------------------------------

# Headers are made when the test runs, not at collection: a call token lives 120 s, and a long suite collects this
# module many minutes before it runs.
@pytest.mark.parametrize("make_headers,status", [
    (lambda: {}, 401),
    (lambda: {"Authorization": "Bearer wrong"}, 401),
    (lambda: {AUTH_HEADER: OTHER_SECRET.sign_call(ENGINE_SCOPE)}, 401),           # another deployment's secret
    (lambda: {AUTH_HEADER: SECRET.sign_call("kv")}, 401),                         # a token for another scope
    (lambda: {AUTH_HEADER: SECRET.sign_call(ENGINE_SCOPE, now=time.time() - 600)}, 401),  # expired
    (lambda: {AUTH_HEADER: SECRET.sign_call(ENGINE_SCOPE)}, 200),                 # what the router sends
    (lambda: {"Authorization": f"Bearer {KEY}"}, 200),                            # a user with the pod's own key
], ids=["none", "wrong-key", "other-secret", "other-scope", "expired", "token", "api-key"])
def test_http_calls_need_a_token_or_the_api_key(srv, make_headers, status):
    headers = make_headers()
    r = httpx.post(f"{srv.url}/v1/completions", json=body(), headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["type"] == "authentication_error"
        assert SECRET.to_text() not in r.text
    for path in ("/v1/models", "/tokenize"):
        method = httpx.get if path == "/v1/models" else lambda u, **kw: httpx.post(u, json={"prompt": "hi"}, **kw)
        assert method(f"{srv.url}{path}", headers=headers).status_code == status


def test_health_and_metrics_stay_open(srv):
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert httpx.get(f"{srv.url}/metrics").status_code == 200


def _grpc_generate(srv, metadata):
    request = pb.GenerateRequest(text="Hello", sampling_params=pb.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        return list(pb_grpc.GenerationStub(ch).Generate(request, metadata=metadata, timeout=30))


def test_grpc_calls_need_a_token_or_the_api_key(srv):
    for metadata in [(), (("authorization", "Bearer wrong"),),
                     ((AUTH_HEADER, OTHER_SECRET.sign_call(ENGINE_SCOPE)),)]:
        with pytest.raises(grpc.RpcError) as info:
            _grpc_generate(srv, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for metadata in [((AUTH_HEADER, SECRET.sign_call(ENGINE_SCOPE)),), (("authorization", f"Bearer {KEY}"),)]:
        assert _grpc_generate(srv, metadata)[-1].HasField("usage")
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:  # probes need nothing
        info_stub = pb_grpc.GenerationStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            info_stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x02\xc3\x28"], ids=["corrupt-wire", "bad-utf8-string"])
def test_malformed_grpc_message_is_invalid_argument(srv, raw):
    metadata = ((AUTH_HEADER, SECRET.sign_call(ENGINE_SCOPE)),)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        for method in ("/pdserve.v1.Generation/Generate", "/pdserve.v1.Generation/Tokenize"):
            call = (ch.unary_stream(method) if method.endswith("Generate") else ch.unary_unary(method))
            with pytest.raises(grpc.RpcError) as info:
                result = call(raw, metadata=metadata, timeout=10)
                list(result) if method.endswith("Generate") else result
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "DecodeError" not in info.value.details() and "Error parsing" not in info.value.details()
    assert _grpc_generate(srv, metadata)[-1].HasField("usage")


# -- bodies the parser or tokenizer used to turn into 500s --------------------------------------------------------

BAD_BODIES = [
    ("seed-2**64", json.dumps(body(seed=2 ** 64)), "64-bit"),
    ("top_k-2**63", json.dumps(body(top_k=2 ** 63)), "64-bit"),
    ("huge-integer", '{"model": "%s", "prompt": "hi", "seed": %s}' % (NAME, "9" * 5000), "integer"),
    ("lone-surrogate", '{"model": "%s", "prompt": "\\ud800", "max_tokens": 2}' % NAME, "surrogate"),
    ("lone-surrogate-in-key", '{"model": "%s", "prompt": "hi", "\\udc00": 1}' % NAME, "surrogate"),
    ("nested-10000", '{"model": "%s", "prompt": "hi", "x": ' % NAME + "[" * 10000 + "]" * 10000 + "}", "nested"),
    ("not-utf8", b'{"prompt": "\xff"}', "UTF-8"),
    # Found by the fuzzer: the message carried "KeyError('block_hashes')".
    ("kv-handle-missing-field", json.dumps(body(kv_transfer_params={"connector": "grpc"})), "lacks 'transfer_id'"),
    ("kv-handle-bad-types", json.dumps(body(kv_transfer_params={"connector": "grpc", "transfer_id": "t",
                                                                "num_tokens": "x", "block_hashes": 5,
                                                                "descriptor": 1})), "block_hashes is malformed"),
]


@pytest.mark.parametrize("raw,words", [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_400_without_exception_reprs(srv, raw, words):
    r = httpx.post(f"{srv.url}/v1/completions", content=raw, timeout=30,
                   headers={**key_headers(), "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and "Error(" not in error["message"] and "Traceback" not in r.text
    assert_good_request_works(srv)


def test_lone_surrogate_in_chat_is_400(srv):
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "a\\udfffb"}]}' % NAME
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=raw, timeout=30,
                   headers={**key_headers(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


# -- raw sockets: sizes and deadlines ------------------------------------------------------------------------------

def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return s


def read_until_closed(s: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    s.settimeout(limit_s)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def request_head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def test_chunked_body_over_the_limit_is_413_while_it_streams(srv):
    """The body never ends: only a limit counted while it streams can answer (413, not the 408 of the deadline)."""
    with connect(srv) as s:
        s.sendall(request_head("/v1/completions", "Transfer-Encoding: chunked\r\n"))
        chunk = b"x" * 8192
        for _ in range(MAX_BODY // len(chunk) + 2):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        data, took = read_until_closed(s, 10)
    assert status_of(data) == 413, data[:300]
    assert took < BODY_TIMEOUT_S and b"request_too_large" in data
    assert_good_request_works(srv)


def test_content_length_over_the_limit_is_413(srv):
    with connect(srv) as s:
        s.sendall(request_head("/v1/completions", f"Content-Length: {50 << 20}\r\n"))
        data, _ = read_until_closed(s, 10)
    assert status_of(data) == 413


@pytest.mark.parametrize("head,sent", [
    ("Content-Length: 100\r\n", b'{"model": '),            # a Content-Length larger than the body
    ("Transfer-Encoding: chunked\r\n", b"5\r\n{\"a\":\r\n"),  # a chunked body that stops
], ids=["short-content-length", "chunked-stops"])
def test_body_that_stops_is_closed_with_408(srv, head, sent):
    with connect(srv) as s:
        s.sendall(request_head("/v1/completions", head) + sent)
        data, took = read_until_closed(s, 10)
    assert status_of(data) == 408, data[:300]
    assert BODY_TIMEOUT_S * 0.9 <= took < BODY_TIMEOUT_S + 3
    assert b"Python" not in data and b"Error(" not in data
    assert_good_request_works(srv)


def test_content_length_with_transfer_encoding_is_refused(srv):
    """Conflicting framing (a request-smuggling vector) gets a 400 at once, never an open connection."""
    with connect(srv) as s:
        s.sendall(request_head("/v1/completions", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n")
                  + b"5\r\n{\"a\":\r\n")
        data, took = read_until_closed(s, 10)
    assert status_of(data) == 400 and b"bad_framing" in data, data[:300]
    assert took < BODY_TIMEOUT_S  # refused at once, before any of the body is read


def test_headers_that_never_end_are_closed_with_408(srv):
    with connect(srv) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
        data, took = read_until_closed(s, 10)
    assert status_of(data) == 408 and HEADER_TIMEOUT_S * 0.9 <= took < HEADER_TIMEOUT_S + 3


def test_slow_headers_cannot_keep_a_connection_alive(srv):
    """A byte now and then restarted no deadline: the whole header block has HEADER_TIMEOUT_S."""
    with connect(srv) as s:
        start = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 40:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - start > HEADER_TIMEOUT_S + 2:
                break
        data, _ = read_until_closed(s, 5)
        assert closed or status_of(data) == 408
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 3


def test_idle_connection_is_closed(srv):
    with connect(srv) as s:
        data, took = read_until_closed(s, 10)
    assert data == b"" and took < HEADER_TIMEOUT_S + 3


def test_kept_alive_connection_gets_a_new_header_deadline(srv):
    with connect(srv) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        first = s.recv(65536)
        assert status_of(first) == 200
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the second request stalls in its headers
        data, took = read_until_closed(s, 10)
    assert status_of(data) == 408 and took < HEADER_TIMEOUT_S + 3


# -- bounded by default ---------------------------------------------------------------------------------------------

def test_grpc_calls_beyond_max_concurrent_rpcs_are_resource_exhausted(model_config, tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers.mock_core import make_slow_mock_core

    settings = ServerSettings(served_model_names=(NAME,), max_concurrent_rpcs=2)
    factory = lambda: AsyncLLM(model_config, core_factory=make_slow_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, settings, grpc=True) as server:
        request = pb.GenerateRequest(text="Hello", sampling_params=pb.SamplingParams(max_tokens=40, ignore_eos=True))

        def call(_: int) -> str:
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                try:
                    list(pb_grpc.GenerationStub(ch).Generate(request, timeout=60))
                    return "OK"
                except grpc.RpcError as exc:
                    return exc.code().name

        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(call, range(6)))
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
        assert call(0) == "OK"


def test_health_of_a_dead_engine_names_no_internals(model_config, tokenizer):
    import os
    import signal

    factory = lambda: AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, ServerSettings(served_model_names=(NAME,))) as server:
        os.kill(server.engine._proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{server.url}/health")).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        error = r.json()["error"]
        assert error["code"] == "engine_dead" and error["message"] == "the engine is not serving", error


def test_cli_limits_are_bounded_by_default_and_the_api_key_comes_from_the_environment(monkeypatch):
    import argparse

    from pdserve.services.api import cli

    parser = argparse.ArgumentParser()
    cli.add_server_arguments(parser)
    args = parser.parse_args([])
    assert args.max_waiting > 0 and args.request_timeout > 0 and args.max_concurrent_rpcs > 0
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    settings = cli.settings_from_args(args, "m", SECRET)
    assert settings.api_key == "from-env" and settings.cluster_secret is SECRET
    assert settings.header_timeout_s > 0 and settings.body_timeout_s > 0 and settings.request_timeout_s > 0
    assert cli.settings_from_args(parser.parse_args(["--api-key", "flag"]), "m").api_key == "flag"
    for bad in (["--header-timeout", "-1"], ["--max-body-bytes", "0"], ["--max-concurrent-rpcs", "-2"]):
        with pytest.raises(ValueError, match=bad[0]):
            cli.settings_from_args(parser.parse_args(bad), "m")


def test_http_requests_beyond_max_concurrent_requests_are_429(model_config, tokenizer):
    """The router has no waiting queue: without this bound a flood piles up sequences waiting for pods."""
    import asyncio

    from tests.helpers.mock_core import make_slow_mock_core

    settings = ServerSettings(served_model_names=(NAME,), max_concurrent_requests=2, retry_after_s=2)
    factory = lambda: AsyncLLM(model_config, core_factory=make_slow_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, settings) as server:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=body(max_tokens=30,
                                                                                       ignore_eos=True))
                                              for _ in range(6)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "too_many_requests" and refused.headers["retry-after"] == "2"
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes are not counted
        assert httpx.post(f"{server.url}/v1/completions", json=body(), timeout=30).status_code == 200
