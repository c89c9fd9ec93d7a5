"""The official ``anthropic`` client (``client.messages``) against ``pdserve serve`` with the bundled model:
greedy answers equal the chat endpoint's, streamed and not; the API key goes in ``x-api-key``; errors come in
Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from api_servers import MODEL

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 8
SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Name three colours."}]
# The client's create() has no sampling arguments (any more); the API still takes them in the body.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def client(real_server):
    return anthropic.Anthropic(base_url=real_server.url, api_key=real_server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def expected(real_server) -> str:
    chat = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)
    r = chat.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *MESSAGES],
                                     max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content


def test_message_equals_chat(client, expected):
    m = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, system=SYSTEM, messages=MESSAGES,
                               **GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == expected
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert (m.stop_reason == "max_tokens") == (m.usage.output_tokens == MAX_TOKENS)
    assert m.usage.input_tokens > 0


def test_streamed_message_equals_chat(client, expected):
    with client.messages.stream(model=MODEL, max_tokens=MAX_TOKENS, **GREEDY, messages=MESSAGES,
                                system=[{"type": "text", "text": SYSTEM}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"content_block_delta", "text"}
    assert final.content[0].text == expected
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


def test_stop_sequences(client):
    full = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=MESSAGES, **GREEDY)
    word = full.content[0].text.split()[1]
    m = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=MESSAGES,
                               stop_sequences=[word], **GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert word not in m.content[0].text and full.content[0].text.startswith(m.content[0].text)


def test_errors_in_anthropic_shape(real_server, client):
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES,
                               tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert exc.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "tools is not supported by this server"}}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}])
    assert "messages.0.content" in exc.value.body["error"]["message"]
    r = httpx.post(f"{real_server.url}/v1/messages", headers={"x-api-key": real_server.api_key},
                   json={"model": MODEL, "messages": MESSAGES})  # max_tokens is required
    assert r.status_code == 400 and r.json()["type"] == "error" and "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as exc:
        anthropic.Anthropic(base_url=real_server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=MESSAGES)
    assert exc.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=8, messages=MESSAGES)
