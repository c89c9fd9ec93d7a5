"""The per-request timeline in one process: the real router (HTTP app, engine, pipeline) over fake pods that send
their marks as real pods do. The opt-in extension (body, last SSE chunk, header), the phase histograms, the
access log, and the timeline's arithmetic."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from router_fakes import FakePodBackend
from test_router_flow import started

from pdserve.engine.frontend.timing import PodMarks, Timeline
from pdserve.services.router.anatomy import phase_kind

PROMPT = list(range(100, 140))  # long enough for remote prefill under the test routing config
HEADERS = {"x-pdserve-timing": "1"}


class TimedPods(FakePodBackend):
    """Fake pods that take a few milliseconds and report their marks (with a KV load on the decode pod)."""

    async def prefill(self, pod, req):
        received = time.time()
        await asyncio.sleep(0.004)
        first, handle = await super().prefill(pod, req)
        first.pod_timing = PodMarks(received=received, scheduled=received + 0.001, first_token=received + 0.003,
                                    sent=time.time(), role="prefill", connector="shared-fs")
        return first, handle

    async def generate(self, pod, req):
        received, first = time.time(), True
        await asyncio.sleep(0.003)
        async for delta in super().generate(pod, req):
            if first:
                delta.pod_timing = PodMarks(received=received, kv_load_start=received + 0.0005,
                                            kv_load_end=received + 0.002, kv_load_bytes=4096,
                                            scheduled=received + 0.0021, first_token=received + 0.0025,
                                            sent=time.time(), role="decode", connector="shared-fs")
                first = False
            yield delta


def body(**kw):
    return {"model": "fake", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, **kw}


async def with_router(fn):
    running = await started(TimedPods())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=running.asgi_app()),
                                     base_url="http://router") as client:
            return await fn(client, running)
    finally:
        await running.stop()


EXPECTED = ["routing", "router_to_prefill", "prefill_queue", "prefill_compute", "prefill_respond",
            "prefill_to_router", "router_respond", "router_to_decode", "decode_queue", "decode_kv_load",
            "decode_compute", "decode_respond", "decode_to_router", "decode_stream"]


def test_non_streamed_response_carries_the_timeline_and_the_header():
    async def run(client, running):
        before = running.serving_metrics.render().decode()
        resp = await client.post("/v1/completions", json=body(), headers=HEADERS)
        return resp, before, running.serving_metrics.render().decode()

    resp, before, after = asyncio.run(with_router(run))
    assert resp.status_code == 200
    timing = resp.json()["pdserve_timing"]
    assert [p["phase"] for p in timing["phases"]] == EXPECTED
    assert timing["connector"] == "shared-fs"
    ttft = [p for p in timing["phases"] if p["ttft"]]
    assert [p["phase"] for p in ttft] == EXPECTED[:7]
    assert sum(p["seconds"] for p in ttft) == pytest.approx(timing["ttft_s"], abs=1e-5)
    assert sum(p["seconds"] for p in timing["phases"]) == pytest.approx(timing["total_s"], abs=1e-5)
    load = timing["phases"][EXPECTED.index("decode_kv_load")]
    assert load["kv_bytes"] == 4096 and load["seconds"] == pytest.approx(0.0015, abs=1e-5)
    header = resp.headers["x-pdserve-timing"]
    assert header.split(";")[0] == f"ttft={timing['ttft_s'] * 1000:.2f}"
    assert [kv.split("=")[0] for kv in header.split(";")[1:]] == EXPECTED
    # The histograms moved: one observation per phase kind, labelled by role and connector.
    line = 'pdserve:request_kv_load_seconds_count{connector="shared-fs",role="decode"} 1.0'
    assert line in after and line not in before
    assert 'pdserve:request_transit_seconds_count{connector="shared-fs",direction="to_pod",role="prefill"} 1.0' \
        in after
    assert 'pdserve:request_timeline_ttft_seconds_count{connector="shared-fs"} 1.0' in after


def test_streamed_response_ends_with_a_timing_chunk():
    async def run(client, running):
        chunks = []
        async with client.stream("POST", "/v1/completions", json=body(stream=True), headers=HEADERS) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
            return resp.headers, chunks

    headers, chunks = asyncio.run(with_router(run))
    assert "x-pdserve-timing" not in headers  # a stream's headers leave before its first token
    assert chunks[-1]["choices"] == [] and [p["phase"] for p in chunks[-1]["pdserve_timing"]["phases"]] == EXPECTED
    assert all("pdserve_timing" not in c for c in chunks[:-1])


def test_off_by_default_and_a_bad_header_is_refused():
    async def run(client, running):
        plain = await client.post("/v1/completions", json=body())
        off = await client.post("/v1/completions", json=body(), headers={"x-pdserve-timing": "0"})
        bad = await client.post("/v1/completions", json=body(), headers={"x-pdserve-timing": "please"})
        return plain, off, bad

    plain, off, bad = asyncio.run(with_router(run))
    for resp in (plain, off):
        assert resp.status_code == 200
        assert "pdserve_timing" not in resp.json() and "x-pdserve-timing" not in resp.headers
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-pdserve-timing"


def test_access_log_line_as_json(caplog):
    async def run(client, running):
        running.engine.access_log = "json"
        return await client.post("/v1/completions", json=body(), headers={"x-session-id": "s"})

    with caplog.at_level(logging.INFO, logger="pdserve.access"):
        resp = asyncio.run(with_router(run))
    assert resp.status_code == 200
    record = json.loads(next(r.getMessage() for r in caplog.records if r.name == "pdserve.access"))
    assert record["finish_reason"] == "length" and record["generation_tokens"] == 5
    assert list(record["phases_ms"]) == EXPECTED
    assert len(record["pods"]) == 2 and "prefill-0" in record["pods"] and record["connector"] == "shared-fs"


def test_timeline_tiles_and_names_its_kinds():
    tl = Timeline(100.0)
    tl.add("routing", 100.01, "router", "router")
    tl.add_pod("decode", PodMarks(received=100.02, scheduled=100.03, first_token=100.10, sent=100.11,
                                  role="both", connector=""), "pod-a", "router_to_decode")
    tl.add("decode_to_router", 100.12, "both", "pod-a")
    tl.add("router_respond", 100.125, "router", "router")
    tl.mark_first_token()
    assert [p.name for p in tl.phases] == ["routing", "router_to_decode", "decode_queue", "decode_compute",
                                           "decode_respond", "decode_to_router", "router_respond"]
    assert tl.ttft == pytest.approx(0.125) and sum(p.seconds for p in tl.ttft_phases()) == pytest.approx(0.125)
    assert {p.role for p in tl.phases[1:-1]} == {"both"}
    assert [phase_kind(p.name)[0] for p in tl.phases] == ["routing", "transit", "queue", "compute", "respond",
                                                         "transit", "respond"]
    assert phase_kind("decode_stream") == ("stream", {})


def test_openmetrics_scrape_carries_trace_exemplars():
    """A request in a trace leaves its trace id as an exemplar on the timeline histograms (OpenMetrics only)."""
    async def run(client, running):
        await client.post("/v1/completions", json=body(),
                          headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
        om = await client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        text = await client.get("/metrics")
        return om, text

    om, text = asyncio.run(with_router(run))
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert '# {trace_id="4bf92f3577b34da6a3ce929d0e0e4736"}' in om.text
    assert "trace_id" not in text.text and text.headers["content-type"].startswith("text/plain")
