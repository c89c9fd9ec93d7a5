"""Issue 13 (C), point 2: ``usage.prompt_tokens_details.cached_tokens`` from the prefix cache, the cached-token
metric by source, and ``stream_options.continuous_usage_stats``, with the official client against a real server
(block size 16: a prompt of a few hundred tokens spans many full blocks)."""

from __future__ import annotations

import uuid

import openai
import pytest

from api_servers import MODEL

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0, timeout=120)


def long_text() -> str:
    """About 300 tokens that no other request shares (a fresh id first)."""
    return f"{uuid.uuid4().hex} " + " ".join(f"Item {i} is on shelf {i * 7 % 13}." for i in range(40))


def cached_metric(server) -> float:
    return server.metric("prompt_tokens_cached_total", source="prefix_cache")


def test_a_repeated_prompt_reports_its_cached_tokens(real_server, client) -> None:
    messages = [{"role": "user", "content": long_text()}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    before = cached_metric(real_server)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    n_prompt = second.usage.prompt_tokens
    assert n_prompt > 250
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Every full block of the prompt but the one holding its last token is a hit the second time.
    assert cached % BLOCK_SIZE == 0 and cached >= (n_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE - BLOCK_SIZE
    assert cached > first.usage.prompt_tokens_details.cached_tokens
    assert cached_metric(real_server) - before >= cached
    assert real_server.metric("prompt_tokens_cached_total", source="connector") == 0


def test_completions_report_cached_tokens_and_continuous_usage(client) -> None:
    prompt = long_text()
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    generated = [c.usage.completion_tokens for c in chunks if c.choices]
    assert generated == sorted(generated) and generated[-1] == 4
    final = chunks[-1]
    assert not final.choices and final.usage.completion_tokens == 4
    assert final.usage.prompt_tokens_details.cached_tokens >= 256


def test_streamed_chat_usage(client) -> None:
    messages = [{"role": "user", "content": long_text()}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])  # without continuous_usage_stats: the last chunk only
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 256
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, stream=True,
                                       stream_options={"continuous_usage_stats": True})
    assert info.value.body["param"] == "stream_options"


def test_cached_tokens_of_several_prompts_and_choices() -> None:
    from pdserve.engine.outputs import CompletionOutput, RequestOutput
    from pdserve.services.api.serving_common import CachedTokens, Usage

    def out(index: int, cached: int) -> RequestOutput:
        return RequestOutput("r", None, [1] * 64, [CompletionOutput(index, "", [])], num_cached_tokens=cached)

    cached = CachedTokens()
    cached.add(0, out(0, 16))
    cached.add(0, out(1, 48))  # the second choice hit what the first computed: the prompt counts 16
    cached.add(1, out(0, 32))
    assert cached.total == 48
    assert Usage(10, 2, cached.total).as_dict()["prompt_tokens_details"] == {"cached_tokens": 48}
    unknown = CachedTokens(known=False)  # behind the router
    unknown.add(0, out(0, 0))
    assert unknown.total is None and "prompt_tokens_details" not in Usage(10, 2, unknown.total).as_dict()
