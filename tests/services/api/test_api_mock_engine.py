"""The HTTP app on the model-free mock core: full queues, timeouts, a dead engine, batches of prompts."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from pdserve.engine.async_engine.client import AsyncLLM
from tests.helpers.mock_core import make_mock_core, make_slow_mock_core
from pdserve.services.api.settings import ServerSettings
from tests.helpers.server_thread import ServerThread

pytestmark = pytest.mark.timeout(120)

NAME = "mock-model"


def settings(**kw) -> ServerSettings:
    return ServerSettings(served_model_names=(NAME, "alias"), **kw)


def body(**kw) -> dict:
    return {"model": NAME, "prompt": "Hello there", "max_tokens": 4, **kw}


def test_queue_full_is_429_with_retry_after(model_config, tokenizer):
    factory = lambda: AsyncLLM(model_config, core_factory=make_slow_mock_core, max_waiting=2,  # noqa: E731
                               tokenizer=tokenizer)
    with ServerThread(factory, settings(retry_after_s=3)) as srv:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body(max_tokens=20))
                                              for _ in range(12)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes, codes
        full = next(r for r in responses if r.status_code == 429)
        assert full.headers["retry-after"] == "3" and full.json()["error"]["code"] == "queue_full"
        assert httpx.post(f"{srv.url}/v1/completions", json=body()).status_code == 200


def test_request_timeout(model_config, tokenizer):
    factory = lambda: AsyncLLM(model_config, core_factory=make_slow_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, settings(request_timeout_s=0.3)) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json=body(max_tokens=200), timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body(max_tokens=200, stream=True)) as s:
            lines = [line for line in s.iter_lines() if line]
        assert '"timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while srv.call(lambda: srv.engine.get_stats().kv_cache_usage) > 0:  # both requests were aborted
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_dead_engine_is_503_and_unhealthy(model_config, tokenizer):
    factory = lambda: AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, settings()) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        os.kill(srv.engine._proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(f"{srv.url}/v1/completions", json=body())
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead" and "retry-after" in r.headers


def test_batch_of_prompts_n_echo_and_aliases(model_config, tokenizer):
    factory = lambda: AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, settings()) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json=body(model="alias", prompt=["one", "two", "three"], n=2,
                                                               echo=True, temperature=0))
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == list(range(6))
        assert choices[0]["text"].startswith("one") and choices[2]["text"].startswith("two")
        assert r.json()["usage"]["completion_tokens"] == 6 * 4
        with httpx.stream("POST", f"{srv.url}/v1/completions",
                          json=body(prompt=["a", "b"], stream=True, max_tokens=3)) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: {")]
        finished = [e for e in events if '"finish_reason":"length"' in e]
        assert len(finished) == 2
        models = httpx.get(f"{srv.url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [NAME, "alias"]


def test_api_key_guards_v1_only(model_config, tokenizer):
    factory = lambda: AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, settings(api_key="k")) as srv:
        assert httpx.post(f"{srv.url}/v1/completions", json=body()).status_code == 401
        assert httpx.post(f"{srv.url}/tokenize", json={"prompt": "x"}).status_code == 401
        ok = httpx.post(f"{srv.url}/v1/completions", json=body(), headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
        assert httpx.get(f"{srv.url}/health").status_code == 200
