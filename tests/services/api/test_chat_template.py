"""Issue 13 (C), point 1: what reaches the chat template, and the reasoning parser, against a real server.

The server runs with ``--chat-template`` (a small template that prints the variables under test) and
``--reasoning-parser think``. The bundled model never thinks by itself, so its answers are forced into shape with a
regex constraint: what is tested is that such output becomes ``reasoning_content`` and ``content``.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from api_servers import MODEL, start_real_server, stop_real_server

# Prints each turn with its tool calls (arguments read as an object) and the call a tool turn answers, then the
# request's template variables, then opens a think block when asked to. (Hugging Face renders templates with
# trim_blocks: the newline after a block tag is dropped.)
TEMPLATE = """\
{%- for m in messages -%}
<|im_start|>{{ m.role }}
{%- if m.tool_calls %} calls:{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments.city }})\
{% endfor %}{% endif %}
{%- if m.tool_call_id %} answers:{{ m.tool_call_id }}{% endif %} | {{ m.content }}<|im_end|>
{% endfor -%}
{%- if note %}note:{{ note }}
{% endif -%}
{%- if reasoning_effort %}effort:{{ reasoning_effort }}
{% endif -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking %}<think>
{% endif %}{% endif -%}
"""

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
]
ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    srv = start_real_server(("--chat-template", str(path), "--reasoning-parser", "think"))
    try:
        yield srv
    finally:
        stop_real_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


def rendered(server, messages: list[dict]) -> str:
    """The prompt text the server renders for ``messages`` (its /tokenize, then /detokenize)."""
    tokens = httpx.post(f"{server.url}/tokenize", headers=server.headers,
                        json={"model": MODEL, "messages": messages}).json()["tokens"]
    return httpx.post(f"{server.url}/detokenize", headers=server.headers,
                      json={"model": MODEL, "tokens": tokens}).json()["prompt"]


def test_tool_calls_and_tool_messages_reach_the_template(server, client) -> None:
    text = rendered(server, HISTORY)
    assert "<|im_start|>assistant calls:get_weather(Paris)" in text  # arguments as an object, not JSON text
    assert "<|im_start|>tool answers:call_7 | sunny" in text
    # The chat endpoint renders the same prompt.
    resp = client.chat.completions.create(model=MODEL, messages=HISTORY, max_tokens=1)
    assert resp.usage.prompt_tokens == len(httpx.post(f"{server.url}/tokenize", headers=server.headers, json={
        "model": MODEL, "messages": HISTORY}).json()["tokens"])


def test_a_tool_message_needs_its_call_id(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[*HISTORY[:2], {"role": "tool", "content": "x"}],
                                       max_tokens=1)
    assert "tool_call_id" in info.value.body["message"]


def test_chat_template_kwargs_and_reasoning_effort_reach_the_template(client) -> None:
    def prompt_tokens(**kwargs) -> int:
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, **kwargs).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"note": "one two three"}}) > plain
    assert prompt_tokens(reasoning_effort="high") > plain
    with pytest.raises(openai.BadRequestError) as info:
        prompt_tokens(extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert info.value.body["param"] == "chat_template_kwargs"


def _think(client, regex: str, stream: bool = False, thinking: bool = False):
    return client.chat.completions.create(
        # Greedy, with room to spare: sampled words can take a token per letter, and a length stop would cut the
        # regex's last word (the test failed so now and then, "All don").
        model=MODEL, messages=ASK, max_tokens=48, temperature=0, stream=stream,
        extra_body={"guided_regex": regex, "chat_template_kwargs": {"enable_thinking": thinking}})


def test_reasoning_is_split_from_the_content(client) -> None:
    msg = _think(client, "<think>[a-z]{3,6}</think>\n\nDone").choices[0].message
    assert 3 <= len(msg.reasoning_content) <= 6 and msg.reasoning_content.isalpha()
    assert msg.content == "Done"
    # The template opened the block itself (enable_thinking): the answer starts in reasoning.
    msg = _think(client, "[a-z]{3,6}</think>Done", thinking=True).choices[0].message
    assert msg.reasoning_content.isalpha() and msg.content == "Done"
    msg = _think(client, "Plain [a-z]{3}").choices[0].message
    assert msg.reasoning_content is None and msg.content.startswith("Plain ")


def test_reasoning_streams_as_reasoning_content_deltas(client) -> None:
    reasoning, content = [], []
    for chunk in _think(client, "<think>[a-z]{3,6} [a-z]{3,6}</think>\n\nAll done", stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
            content.append(delta.content or "")
    assert "".join(content) == "All done"
    words = "".join(reasoning).split(" ")
    assert len(words) == 2 and all(w.isalpha() for w in words)
    assert sum(1 for r in reasoning if r) >= 2  # streamed piece by piece, not held to the end


def test_content_parts(client) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                          max_tokens=1).choices
    for part in ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "file-1"}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, max_tokens=1,
                                           messages=[{"role": "user", "content": [parts[0], part]}])
        assert f"messages[0].content[1]: content parts of type '{part['type']}' are not supported" in \
            info.value.body["message"]
