"""``/v1/models/{id}``, ``/version``, ``POST /reset_prefix_cache`` (behind the API key; it really empties the
engine's prefix cache), and a client that leaves a non-streamed request: no traceback in the server's log, and its
KV blocks are freed."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from api_servers import MODEL

pytestmark = pytest.mark.timeout(300)
# Long enough to fill a few blocks of 16 tokens, so a repeat hits the prefix cache.
PROMPT = "Repeat after me: the quick brown fox jumps over the lazy dog, " * 4


def test_model_by_id_and_version(real_server):
    client = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = httpx.get(f"{real_server.url}/version")  # open, like /health
    assert r.status_code == 200 and r.json()["version"]


def cached_tokens(real_server) -> int:
    r = httpx.post(f"{real_server.url}/v1/responses", headers=real_server.headers, timeout=120,
                   json={"model": MODEL, "input": PROMPT, "max_output_tokens": 1})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["input_tokens_details"]["cached_tokens"]


def reset(real_server, headers) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:  # 409 while an earlier test's request still holds blocks
        r = httpx.post(f"{real_server.url}/reset_prefix_cache", headers=headers, timeout=30)
        if r.status_code != 409 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_reset_prefix_cache_needs_the_key_and_empties_the_cache(real_server):
    assert httpx.post(f"{real_server.url}/reset_prefix_cache").status_code == 401
    cached_tokens(real_server)
    assert cached_tokens(real_server) > 0, "a repeated prompt should hit the prefix cache"
    r = reset(real_server, real_server.headers)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert cached_tokens(real_server) == 0
    assert cached_tokens(real_server) > 0  # and the cache fills again


def test_client_leaving_a_non_streamed_request(real_server):
    with open(real_server.log_path) as f:
        start = len(f.read())
    for path, body in [("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}),
                       # No ignore_eos in the Responses API: a prompt whose answer is long.
                       ("/v1/responses", {"input": "Write a long story about a dragon and a knight.",
                                          "max_output_tokens": 400})]:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{real_server.url}{path}", headers=real_server.headers, json={"model": MODEL, **body},
                       timeout=httpx.Timeout(10, read=1.5))
    real_server.wait_idle()  # every KV block is free again
    assert real_server.metric("num_requests_running") == 0
    time.sleep(0.5)  # asyncio reports a never-retrieved exception when the future is collected
    with open(real_server.log_path) as f:
        log = f.read()[start:]
    assert "Traceback" not in log and "InvalidStateError" not in log and "never retrieved" not in log, log
