"""The router end to end in one process: the real HTTP app, engine, pipeline, health checks and retry logic,
over fake pods (``router_fakes``). Fault cases are table-driven; each checks the exact tokens the client got."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from router_fakes import FakePodBackend, PodBehaviour, WordTokenizer, expected_tokens

from pdserve.engine.sampling_params import SamplingParams
from pdserve.services.api.settings import ServerSettings
from pdserve.services.router.discovery import StaticDiscovery, static_endpoints
from pdserve.services.router.engine import ModelInfo
from pdserve.services.router.routing_config import parse_routing_spec
from pdserve.services.router.sequence import RetryPolicy
from pdserve.services.router.server import RouterConfig, start_router

PROMPT = list(range(100, 140))  # 40 tokens: 10 blocks of 4
ROUTING = {
    "decode": {"scorers": [{"type": "prefix-cache", "weight": 3}, {"type": "load", "weight": 1},
                           {"type": "session-affinity", "weight": 2}]},
    "prefill": {"scorers": [{"type": "load", "weight": 1}]},
    "pd_decider": {"type": "prefix-aware", "min_prompt_tokens": 32, "max_cached_fraction": 0.8},
}


def config(prefill=1, decode=2, routing=None):
    pods = static_endpoints([f"127.0.0.1:{7000 + i}" for i in range(prefill)],
                            [f"127.0.0.1:{7100 + i}" for i in range(decode)])
    return RouterConfig(model=ModelInfo("fake", 512, 1000, 2), settings=ServerSettings(("fake",)),
                        discovery=StaticDiscovery(pods), routing=parse_routing_spec(routing or ROUTING),
                        block_size=4, retry=RetryPolicy(max_attempts=4, backoff_s=0.0, no_pod_wait_s=0.3),
                        health_interval_s=0.05)


async def started(backend, **kw):
    running = await start_router(config(**kw), WordTokenizer(), backend)
    for _ in range(100):
        if len([p for p in running.pods.all() if p.ready]) == len(running.pods.all()) > 0:
            break
        await asyncio.sleep(0.01)
    return running


@contextlib.asynccontextmanager
async def serving(backend, **kw) -> AsyncIterator:
    """:func:`started`, stopped however the test ends."""
    running = await started(backend, **kw)
    try:
        yield running
    finally:
        await running.stop()


async def tokens_of(engine, prompt, max_tokens=12, **params):
    stream = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params))
    out = []
    async for ro in stream:
        out.extend(ro.outputs[0].token_ids)
    return out


FAULTS = [
    # (id, prefill/decode pod behaviours, prompt length, expected retries/resumes by metric)
    ("healthy", {}, 40, {"resumes": 0, "retries": 0}),
    ("decode-dies-mid-stream", {"kill_first_stream_after": 3}, 40, {"resumes": 1}),
    ("decode-dies-mid-stream-short-prompt", {"kill_first_stream_after": 5}, 8, {"resumes": 1}),
    ("decode-refuses-at-start", {"refuse_first_stream": True}, 8, {"retries": 1}),
    ("prefill-down", {"prefill-0": PodBehaviour(fail_at_start=True)}, 40, {"retries": 1}),
    ("short-prompt-decode-only", {"prefill-0": PodBehaviour(fail_at_start=True)}, 8, {"retries": 0}),
]


@pytest.mark.parametrize("behaviours,n_prompt,expect", [c[1:] for c in FAULTS], ids=[c[0] for c in FAULTS])
async def test_faults_give_the_same_tokens(behaviours, n_prompt, expect):
    knobs = {k: v for k, v in behaviours.items() if not isinstance(v, PodBehaviour)}
    backend = FakePodBackend({k: PodBehaviour(**vars(v)) for k, v in behaviours.items() if k not in knobs}, **knobs)
    async with serving(backend) as running:
        prompt = PROMPT[:n_prompt]
        assert await tokens_of(running.engine, prompt) == expected_tokens(prompt, 12)
        m = running.router.metrics
        if "resumes" in expect:
            assert m.resumes._value.get() == expect["resumes"]
        if "retries" in expect:
            total = sum(s.value for metric in m.retries.collect() for s in metric.samples
                        if s.name.endswith("_total"))
            assert total == expect["retries"]
        assert all(p.in_flight == 0 for p in running.pods.all())


async def test_remote_prefill_then_decode_with_handle():
    backend = FakePodBackend()
    async with serving(backend) as running:
        assert await tokens_of(running.engine, PROMPT) == expected_tokens(PROMPT, 12)
        kinds = [(k, pod) for k, pod, _ in backend.calls]
        assert kinds[0] == ("prefill", "prefill-0") and kinds[1][0] == "generate"
        decode_req = backend.calls[1][2]
        assert decode_req.kv_transfer_params["from"] == "prefill-0"
        assert decode_req.prompt_token_ids == PROMPT + expected_tokens(PROMPT, 1)
        assert decode_req.params.max_tokens == 11


async def test_a_transfer_no_decode_pod_took_over_is_released():
    """The decode pod refuses the stream after the prefill answered: the router gives the prefill's transfer back
    (the retry makes a new one); a decode pod that streams answers for its transfer itself (issue 11)."""
    backend = FakePodBackend(refuse_first_stream=True)
    async with serving(backend) as running:
        assert await tokens_of(running.engine, PROMPT) == expected_tokens(PROMPT, 12)
        for _ in range(20):
            await asyncio.sleep(0)  # the release runs as a task
        handles = [req.kv_transfer_params for kind, _, req in backend.calls if kind == "generate"]
        assert len(handles) == 2 and backend.released == [handles[0]]


async def test_a_client_gone_after_the_prefill_releases_the_transfer():
    backend = FakePodBackend({"decode-0": PodBehaviour(delay_s=5.0), "decode-1": PodBehaviour(delay_s=5.0)})
    async with serving(backend) as running:
        task = asyncio.ensure_future(tokens_of(running.engine, PROMPT))
        for _ in range(200):
            if any(kind == "generate" for kind, _, _ in backend.calls):
                break
            await asyncio.sleep(0.01)
        task.cancel()  # the client goes away while the decode pod is still loading
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(20):
            await asyncio.sleep(0)
        assert backend.released == [backend.calls[1][2].kv_transfer_params]


async def test_no_pod_left_fails_cleanly_and_a_returning_pod_gets_traffic():
    backend = FakePodBackend({"decode-0": PodBehaviour(healthy=False)})
    async with serving(backend, prefill=0, decode=1) as running:
        assert not running.engine.is_ready
        with pytest.raises(Exception, match="no decode pod is ready"):
            running.engine.generate(PROMPT[:8], SamplingParams(max_tokens=2))
        backend.behaviours["decode-0"].healthy = True  # the pod comes back
        for _ in range(100):
            if running.engine.is_ready:
                break
            await asyncio.sleep(0.01)
        assert await tokens_of(running.engine, PROMPT[:8], 4) == expected_tokens(PROMPT[:8], 4)


async def test_all_attempts_fail_reports_503_not_a_hang():
    backend = FakePodBackend({"decode-0": PodBehaviour(fail_at_start=True),
                              "decode-1": PodBehaviour(fail_at_start=True)})
    async with serving(backend, prefill=0) as running:
        with pytest.raises(Exception, match="could not be served"):
            await asyncio.wait_for(tokens_of(running.engine, PROMPT[:8]), 5)
        assert all(p.in_flight == 0 for p in running.pods.all())


async def test_same_prefix_goes_to_the_same_decode_pod_without_events():
    backend = FakePodBackend()
    async with serving(backend, prefill=0) as running:
        for tail in range(6):
            await tokens_of(running.engine, PROMPT + [500 + tail], 2)
        decode_pods = {pod for kind, pod, _ in backend.calls if kind == "generate"}
        assert len(decode_pods) == 1


async def test_http_api_session_header_stop_string_and_n():
    backend = FakePodBackend()
    async with serving(backend, prefill=0) as running:
        transport = httpx.ASGITransport(app=running.asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            want = expected_tokens(PROMPT[:8], 6)
            text = "".join(f" w{t}" for t in want)
            r = await client.post("/v1/completions", json={"model": "fake", "prompt": PROMPT[:8], "max_tokens": 6,
                                                          "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text
            # A stop string cuts the text exactly as a monolithic server would.
            stop = f" w{want[3]}"
            r = await client.post("/v1/completions", json={"model": "fake", "prompt": PROMPT[:8], "max_tokens": 6,
                                                          "temperature": 0, "stop": [stop]})
            assert r.json()["choices"][0]["text"] == "".join(f" w{t}" for t in want[:3])
            assert r.json()["choices"][0]["finish_reason"] == "stop"
            # n=2: two sequences, both served.
            r = await client.post("/v1/completions", json={"model": "fake", "prompt": PROMPT[:8], "max_tokens": 3,
                                                          "n": 2, "temperature": 0})
            assert [c["index"] for c in r.json()["choices"]] == [0, 1]
            # Session affinity: short prompts with the same header land on one pod.
            backend.calls.clear()
            for i in range(4):
                await client.post("/v1/completions", headers={"x-session-id": "s1"},
                                  json={"model": "fake", "prompt": [300 + i], "max_tokens": 1})
            assert len({pod for _, pod, _ in backend.calls}) == 1
            # ... and so do requests with the same OpenAI "user" field.
            backend.calls.clear()
            for i in range(4):
                await client.post("/v1/completions", json={"model": "fake", "prompt": [400 + i], "max_tokens": 1,
                                                          "user": "tenant-7"})
            assert len({pod for _, pod, _ in backend.calls}) == 1
            r = await client.get("/router/pods")
            assert {p["name"] for p in r.json()["pods"]} == {"decode-0", "decode-1"}
            assert "pdserve:router_pd_decisions_total" in (await client.get("/metrics")).text


async def test_client_abort_cancels_the_pod_stream():
    backend = FakePodBackend({"decode-0": PodBehaviour(delay_s=0.02), "decode-1": PodBehaviour(delay_s=0.02)})
    async with serving(backend, prefill=0) as running:
        stream = running.engine.generate(PROMPT[:8], SamplingParams(max_tokens=100, temperature=0.0))
        await stream.__anext__()
        stream.close()
        await asyncio.sleep(0.1)
        assert sum(backend.active.values()) == 0
        assert all(p.in_flight == 0 for p in running.pods.all())


async def test_grpc_generate_through_the_router():
    import grpc

    from pdserve.proto.pdserve.v1 import generate_pb2 as pb
    from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc

    backend = FakePodBackend()
    async with serving(backend, prefill=0) as running:
        port = await running.start_grpc("127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT[:8]),
                                         sampling_params=pb.SamplingParams(max_tokens=5, temperature=0.0))
            tokens, usage = [], None
            async for resp in stub.Generate(request):
                for choice in resp.choices:
                    tokens.extend(choice.token_ids)
                if resp.HasField("usage"):
                    usage = resp.usage
        assert tokens == expected_tokens(PROMPT[:8], 5)
        assert (usage.prompt_tokens, usage.completion_tokens) == (8, 5)


BAD_REQUESTS = [
    # (id, body, status, error param) -- refused by the router itself: no pod is contacted
    ("prompt-too-long", {"prompt": list(range(10, 600)), "max_tokens": 4}, 400, "prompt"),
    ("prompt-plus-max-tokens", {"prompt": list(range(10, 500)), "max_tokens": 100}, 400, "max_tokens"),
    ("token-outside-vocab", {"prompt": [5, 5000], "max_tokens": 4}, 400, "prompt"),
    ("bad-temperature", {"prompt": [5], "temperature": -1}, 400, "temperature"),
    ("unknown-model", {"prompt": [5], "model": "gpt-9"}, 404, None),
]


@pytest.mark.parametrize("body,status,param", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_requests_never_reach_a_pod(body, status, param):
    backend = FakePodBackend()
    async with serving(backend, prefill=0) as running:
        transport = httpx.ASGITransport(app=running.asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            r = await client.post("/v1/completions", json={"model": "fake", **body})
        assert r.status_code == status, r.text
        if param is not None:
            assert r.json()["error"]["param"] == param
        assert backend.calls == []
