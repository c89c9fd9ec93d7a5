"""Table-driven bad requests against ``pdserve serve``: each gets the right status and OpenAI's error body, and
the server answers the next good request."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from api_servers import API_KEY, MAX_MODEL_LEN, MODEL

pytestmark = pytest.mark.timeout(600)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
CHAT_GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


@dataclass
class Bad:
    name: str
    path: str
    status: int
    body: Any = None  # dict -> JSON; bytes -> sent as is
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


def completion(**overrides: Any) -> dict:
    return {**GOOD, **overrides}


def chat(**overrides: Any) -> dict:
    return {**CHAT_GOOD, **overrides}


LONG_PROMPT = [1] * (MAX_MODEL_LEN + 10)

CASES = [
    Bad("malformed json", COMPLETIONS, 400, b'{"prompt": "Hi",', code="invalid_json"),
    Bad("empty body", COMPLETIONS, 400, b"", code="invalid_json"),
    Bad("not utf-8", COMPLETIONS, 400, b"\xff\xfe\x00garbage", code="invalid_json"),
    Bad("json array body", COMPLETIONS, 400, [1, 2], code="invalid_json"),
    Bad("missing prompt", COMPLETIONS, 400, {"model": MODEL}, param="prompt"),
    Bad("prompt wrong type", COMPLETIONS, 400, completion(prompt=42), param="prompt"),
    Bad("empty prompt list", COMPLETIONS, 400, completion(prompt=[]), param="prompt"),
    Bad("empty prompt text", COMPLETIONS, 400, completion(prompt=""), param="prompt"),
    Bad("too many prompts", COMPLETIONS, 400, completion(prompt=["a"] * 33), param="prompt"),
    Bad("token id out of vocabulary", COMPLETIONS, 400, completion(prompt=[1, 10_000_000]), param="prompt"),
    Bad("max_tokens wrong type", COMPLETIONS, 400, completion(max_tokens="5"), param="max_tokens"),
    Bad("max_tokens negative", COMPLETIONS, 400, completion(max_tokens=-3), param="max_tokens"),
    Bad("max_tokens zero", COMPLETIONS, 400, completion(max_tokens=0), param="max_tokens"),
    Bad("temperature negative", COMPLETIONS, 400, completion(temperature=-1), param="temperature"),
    Bad("temperature wrong type", COMPLETIONS, 400, completion(temperature="hot"), param="temperature"),
    Bad("top_p out of range", COMPLETIONS, 400, completion(top_p=5), param="top_p"),
    Bad("top_k wrong type", COMPLETIONS, 400, completion(top_k=2.5), param="top_k"),
    Bad("presence_penalty out of range", COMPLETIONS, 400, completion(presence_penalty=9), param="presence_penalty"),
    Bad("repetition_penalty zero", COMPLETIONS, 400, completion(repetition_penalty=0), param="repetition_penalty"),
    Bad("seed not an integer", COMPLETIONS, 400, completion(seed=1.5), param="seed"),
    Bad("stream wrong type", COMPLETIONS, 400, completion(stream="yes"), param="stream"),
    Bad("n too large", COMPLETIONS, 400, completion(n=17), param="n"),
    Bad("n zero", COMPLETIONS, 400, completion(n=0), param="n"),
    Bad("too many stop strings", COMPLETIONS, 400, completion(stop=[f"s{i}" for i in range(17)]), param="stop"),
    Bad("stop string too long", COMPLETIONS, 400, completion(stop=["x" * 300]), param="stop"),
    Bad("logprobs too many", COMPLETIONS, 400, completion(logprobs=50), param="logprobs"),
    Bad("logit_bias out of range", COMPLETIONS, 400, completion(logit_bias={"1": 500}), param="logit_bias"),
    Bad("best_of below n", COMPLETIONS, 400, completion(n=2, best_of=1), param="best_of"),
    Bad("stream_options without stream", COMPLETIONS, 400, completion(stream_options={"include_usage": True}),
        param="stream_options"),
    Bad("prompt longer than the context", COMPLETIONS, 400, completion(prompt=LONG_PROMPT), param="prompt",
        code="context_length_exceeded"),
    Bad("prompt plus max_tokens over the context", COMPLETIONS, 400, completion(max_tokens=MAX_MODEL_LEN),
        param="max_tokens", code="context_length_exceeded"),
    Bad("unknown model", COMPLETIONS, 404, completion(model="gpt-17"), param="model", code="model_not_found"),
    Bad("unknown model (chat)", CHAT, 404, chat(model="nope"), param="model", code="model_not_found"),
    Bad("oversized body", COMPLETIONS, 413, completion(prompt="x" * (5 << 20)), code="request_too_large"),
    Bad("bad api key", COMPLETIONS, 401, completion(), code="invalid_api_key",
        headers={"Authorization": "Bearer wrong"}),
    Bad("missing api key", CHAT, 401, chat(), code="invalid_api_key", headers={"Authorization": ""}),
    Bad("chat without messages", CHAT, 400, chat(messages=[]), param="messages"),
    Bad("chat bad role", CHAT, 400, chat(messages=[{"role": "wizard", "content": "x"}]), param="messages.0.role"),
    Bad("chat content wrong type", CHAT, 400, chat(messages=[{"role": "user", "content": 5}]),
        param="messages.0.content"),
    Bad("chat top_logprobs without logprobs", CHAT, 400, chat(top_logprobs=3), param="top_logprobs"),
    Bad("chat malformed tool", CHAT, 400, chat(tools=[{"type": "function"}]), param="tools"),
    Bad("chat max_completion_tokens negative", CHAT, 400, chat(max_completion_tokens=-1), param="max_tokens"),
    Bad("detokenize out of vocabulary", "/detokenize", 400, {"tokens": [-1]}, param="tokens"),
    Bad("tokenize with nothing", "/tokenize", 400, {}, param="prompt"),
    Bad("wrong method", COMPLETIONS, 405, method="GET"),
    Bad("unknown path", "/v1/nothing-here", 404, {}),
]


@pytest.fixture(scope="module")
def http(real_server):
    with httpx.Client(base_url=real_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as client:
        yield client


def send(http: httpx.Client, case: Bad) -> httpx.Response:
    if case.method == "GET":
        return http.get(case.path, headers=case.headers)
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    return http.post(case.path, content=content, headers={"Content-Type": "application/json", **case.headers})


def test_the_table_is_large_enough():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request(http, case):
    r = send(http, case)
    assert r.status_code == case.status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if case.param is not None:
        assert err["param"] == case.param, err
    if case.code is not None:
        assert err["code"] == case.code, err
    if case.status == 401:
        assert r.headers.get("www-authenticate") == "Bearer"
    # The server still answers a good request.
    good = http.post(COMPLETIONS, json=GOOD)
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] == 1


def test_chunked_oversized_body_without_length(http):
    def chunks():
        for _ in range(6):
            yield b" " * (1 << 20)

    r = http.post(COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert http.post(COMPLETIONS, json=GOOD).status_code == 200


def test_health_and_metrics_need_no_key(real_server):
    assert httpx.get(f"{real_server.url}/health").status_code == 200
    assert httpx.get(f"{real_server.url}/metrics").status_code == 200
