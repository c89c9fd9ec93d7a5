"""Issue 11: tokenizing a 4 MiB prompt does not stall the server's event loop.

The real app and ``AsyncLLM`` (model-free core, the bundled model's real tokenizer) in this test's event loop:
a ticker measures the longest gap between its wake-ups while the big prompt is tokenized. Before, the handler
tokenized on the loop, so the gap was the whole tokenization (seconds); now it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from pdserve.engine.async_engine.client import AsyncLLM
from tests.helpers.mock_core import make_mock_core
from pdserve.services.api.app import build_app
from pdserve.services.api.settings import ServerSettings

pytestmark = pytest.mark.timeout(180)

NAME = "mock-model"


async def test_a_4_mib_prompt_is_tokenized_off_the_event_loop(model_config, tokenizer):
    text = ("The quick brown fox jumps over the lazy dog. " * 100_000)[:4 << 20]
    settings = ServerSettings(served_model_names=(NAME,), max_body_bytes=16 << 20)
    async with AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer) as engine:
        app = build_app(engine, settings)
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=150) as client:
            start = time.monotonic()
            r = await client.post("/v1/completions", json={"model": NAME, "prompt": text, "max_tokens": 2})
            elapsed = time.monotonic() - start
            done.set()
            await tick
            # ~900k tokens: far beyond the context, refused once tokenized.
            assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
            # A short request is still served (the server is fine afterwards).
            ok = await client.post("/v1/completions", json={"model": NAME, "prompt": "Hello", "max_tokens": 2})
            assert ok.status_code == 200, ok.text
        assert elapsed > 0.5, "the tokenization was too quick to tell anything"
        # Parsing the 4 MiB JSON body stays on the loop (tens of milliseconds); tokenization does not.
        assert max(gaps) < min(0.5, elapsed / 3), (max(gaps), elapsed)
