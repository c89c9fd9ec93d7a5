"""Against ``pdserve serve``: disconnects free blocks, 200 concurrent streams all finish, metrics move."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from api_servers import API_KEY, MODEL

pytestmark = pytest.mark.timeout(600)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "max_tokens": 400, "temperature": 0,
        "ignore_eos": True}

GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]
COUNTERS = ["prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total", "prompt_tokens_total",
            "generation_tokens_total"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "time_per_output_token_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "iteration_tokens_total"]


def aborts(server) -> float:
    return server.metric("request_success_total", finished_reason="abort")


def wait_for_usage(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("kv_cache_usage_perc") == 0:
        assert time.monotonic() < deadline, "the request never got KV blocks"
        time.sleep(0.05)


def test_streaming_client_disconnect_frees_blocks(real_server):
    real_server.wait_idle()
    before = aborts(real_server)
    with httpx.Client(base_url=real_server.url, headers=HEADERS, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: {")
                if got == 3:
                    break
            wait_for_usage(real_server)
        # Leaving the block closes the connection mid-stream.
    real_server.wait_idle(timeout=30)
    assert aborts(real_server) == before + 1


def test_non_streaming_client_disconnect_frees_blocks(real_server):
    real_server.wait_idle()
    before = aborts(real_server)
    body = json.dumps(LONG).encode()
    host, port = real_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for_usage(real_server)
    real_server.wait_idle(timeout=30)
    assert aborts(real_server) == before + 1


async def _stream_one(client: httpx.AsyncClient, i: int) -> dict:
    body = {"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks, done = [], False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert done and "error" not in chunks[-1]
    return chunks[-1]["usage"]


def test_200_concurrent_streams_complete(real_server):
    real_server.wait_idle()

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=real_server.url, headers=HEADERS, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(_stream_one(c, i) for i in range(200)))

    usages = asyncio.run(main())
    assert len(usages) == 200 and all(u["completion_tokens"] == 4 for u in usages)
    real_server.wait_idle(timeout=30)  # no leaked blocks


def test_metrics_are_exposed_and_move(real_server):
    real_server.wait_idle()
    m0 = real_server.metrics()
    label = f'{{model_name="{MODEL}"}}'
    for name in GAUGES + COUNTERS:
        assert f"pdserve:{name}{label}" in m0, name
    for name in HISTOGRAMS:
        assert f"pdserve:{name}_count{label}" in m0, name
    for reason in ("stop", "length", "abort"):
        assert f'pdserve:request_success_total{{finished_reason="{reason}",model_name="{MODEL}"}}' in m0

    # The same 40-token prompt twice: the second finds its full blocks in the prefix cache.
    prompt = " ".join(["alpha beta gamma delta"] * 10)
    with httpx.Client(base_url=real_server.url, headers=HEADERS, timeout=120) as http:
        for stream in (False, True):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3,
                                                    "temperature": 0, "ignore_eos": True, "stream": stream})
            assert r.status_code == 200
    real_server.wait_idle()
    m1 = real_server.metrics()

    def delta(key: str) -> float:
        return m1[key] - m0[key]

    assert delta(f"pdserve:prompt_tokens_total{label}") >= 2 * 40
    assert delta(f"pdserve:generation_tokens_total{label}") == 6
    assert delta(f"pdserve:prefix_cache_queries_total{label}") > 0
    assert delta(f"pdserve:prefix_cache_hits_total{label}") >= 32
    assert delta(f'pdserve:request_success_total{{finished_reason="length",model_name="{MODEL}"}}') == 2
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(f"pdserve:{name}_count{label}") == 2, name
    assert delta(f"pdserve:inter_token_latency_seconds_count{label}") == 4
    assert delta(f"pdserve:iteration_tokens_total_count{label}") >= 3
    assert delta(f"pdserve:iteration_tokens_total_sum{label}") >= 40
