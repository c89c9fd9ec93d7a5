"""The opt-in timeline on a single server (``pdserve serve``): the engine's own phases, from the HTTP handler to
the last token, on the model-free core behind the real app and a real socket."""

from __future__ import annotations

import httpx
import pytest

from pdserve.engine.async_engine.client import AsyncLLM
from pdserve.services.api.settings import ServerSettings
from tests.helpers.mock_core import make_mock_core
from tests.helpers.server_thread import ServerThread

pytestmark = pytest.mark.timeout(120)


def test_single_server_timeline(model_config, tokenizer):
    factory = lambda: AsyncLLM(model_config, core_factory=make_mock_core, tokenizer=tokenizer)  # noqa: E731
    with ServerThread(factory, ServerSettings(served_model_names=("mock-model",))) as srv:
        body = {"model": "mock-model", "prompt": "Hello there", "max_tokens": 4}
        resp = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"x-pdserve-timing": "1"}, timeout=30)
        plain = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200
    timing = resp.json()["pdserve_timing"]
    names = [p["phase"] for p in timing["phases"]]
    assert names == ["api_receive", "queue", "compute", "respond", "stream"]
    assert {p["role"] for p in timing["phases"]} == {"both"}
    assert all(p["seconds"] >= 0 for p in timing["phases"])
    assert sum(p["seconds"] for p in timing["phases"] if p["ttft"]) == pytest.approx(timing["ttft_s"], abs=1e-5)
    assert resp.headers["x-pdserve-timing"].startswith("ttft=")
    assert "pdserve_timing" not in plain.json()
