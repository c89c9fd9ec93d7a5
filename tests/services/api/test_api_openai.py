"""The official ``openai`` client against ``pdserve serve`` with the bundled model; greedy answers equal the
offline ``LLM`` API's."""

from __future__ import annotations

import asyncio

import openai
import pytest

from pdserve import SamplingParams

from api_servers import MODEL

pytestmark = pytest.mark.timeout(600)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
MAX_TOKENS = 8
CHAT = [{"role": "user", "content": "What is the capital of Germany?"}]


@pytest.fixture(scope="module")
def expected(offline_llm):
    """Offline greedy answers, one prompt at a time (as the server sees them)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    completions = [offline_llm.generate([p], params)[0].outputs[0].text for p in PROMPTS]
    chat = offline_llm.chat(CHAT, params)[0].outputs[0].text
    return {"completions": completions, "chat": chat}


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)


@pytest.fixture
def async_client(real_server):
    # Per test: an async client belongs to the event loop it was first used on.
    return openai.AsyncOpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_sync_completions_equal_offline(client, expected):
    for prompt, want in zip(PROMPTS, expected["completions"]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.completion_tokens == MAX_TOKENS or r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_sync_streamed_completion_equals_offline(client, expected):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected["completions"][0]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_sync_chat_equals_offline(client, expected):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == expected["chat"]
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 0


def test_sync_streamed_chat_equals_offline(client, expected):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["chat"]


async def test_async_client_streamed_and_not(async_client, expected):
    r = await async_client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                              temperature=0)
    assert r.choices[0].text == expected["completions"][1]
    streamed = await async_client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=True)
    assert "".join([c.choices[0].text async for c in streamed if c.choices]) == expected["completions"][1]
    stream = await async_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS,
                                                        temperature=0, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == expected["chat"]
    chat = await async_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS,
                                                      temperature=0)
    assert chat.choices[0].message.content == expected["chat"]


async def test_async_concurrent_greedy_requests_are_consistent(async_client, expected):
    # Batched with each other in the engine, each request still gets its own greedy answer.
    results = await asyncio.gather(*(async_client.completions.create(
        model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in PROMPTS))
    assert [r.choices[0].text for r in results] == expected["completions"]


def test_sampling_options_n_seed_stop_logprobs(client):
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0.8, top_p=0.9, seed=1234, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 3 and [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    word = greedy.choices[0].text.split()[0]
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                        stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text
    lp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == 3 and len(lp.choices[0].logprobs.top_logprobs[0]) == 2
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"top_k": 5, "min_p": 0.01,
                                                                      "repetition_penalty": 1.1, "ignore_eos": True},
                                          presence_penalty=0.5, frequency_penalty=0.5, user="tester")
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2 and chat.usage.completion_tokens == 3


def test_tokenize_detokenize(real_server):
    import httpx

    h = real_server.headers
    tok = httpx.post(f"{real_server.url}/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 512
    back = httpx.post(f"{real_server.url}/detokenize", json={"tokens": tok["tokens"]}, headers=h).json()
    assert back["prompt"] == "Hello world"
    chat = httpx.post(f"{real_server.url}/tokenize", json={"messages": CHAT}, headers=h).json()
    assert chat["count"] > tok["count"]
