"""The official ``openai`` client's Responses API (``client.responses``) against ``pdserve serve`` with the bundled
model: greedy answers equal the chat endpoint's for the same conversation, streamed and not, and
``previous_response_id`` continues a stored conversation."""

from __future__ import annotations

import httpx
import openai
import pytest

from api_servers import MODEL

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)


def chat_answer(client, messages) -> str:
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content


def test_response_equals_chat_with_instructions(client):
    r = client.responses.create(model=MODEL, instructions="Answer in French.", input="What colour is the sky?",
                                max_output_tokens=MAX_TOKENS, temperature=0)
    want = chat_answer(client, [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "What colour is the sky?"}])
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == want and want
    assert r.status in ("completed", "incomplete")
    assert (r.status == "incomplete") == (r.usage.output_tokens == MAX_TOKENS and r.incomplete_details is not None)
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_streamed_response_events(client):
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]}]
    events = list(client.responses.create(model=MODEL, input=messages, max_output_tokens=MAX_TOKENS,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text
    assert text == chat_answer(client, [{"role": "user", "content": "Name a fruit."}])


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=MAX_TOKENS,
                                    temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=MAX_TOKENS, temperature=0)
    assert second.previous_response_id == first.id
    want = chat_answer(client, [{"role": "user", "content": "My name is Ada."},
                                {"role": "assistant", "content": first.output_text},
                                {"role": "user", "content": "What is my name?"}])
    assert second.output_text == want
    # Streamed follow-ups are stored too, and can be continued.
    third = list(client.responses.create(model=MODEL, input="Thanks.", previous_response_id=second.id,
                                         max_output_tokens=2, temperature=0, stream=True))[-1].response
    assert client.responses.create(model=MODEL, input="Bye.", previous_response_id=third.id,
                                   max_output_tokens=2).output_text is not None


def test_store_false_and_unknown_ids_are_404(client):
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    for rid in (unstored.id, "resp_doesnotexist"):
        with pytest.raises(openai.NotFoundError) as exc:
            client.responses.create(model=MODEL, input="again", previous_response_id=rid, max_output_tokens=2)
        assert exc.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "name": "f", "parameters": {}}]),
                                          ("reasoning", {"effort": "low"}), ("background", True),
                                          ("include", ["message.output_text.logprobs"])])
def test_unsupported_fields_are_refused_by_name(real_server, field, value):
    r = httpx.post(f"{real_server.url}/v1/responses", headers=real_server.headers,
                   json={"model": MODEL, "input": "Hi", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_non_text_input_is_refused(real_server):
    item = {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
    r = httpx.post(f"{real_server.url}/v1/responses", headers=real_server.headers,
                   json={"model": MODEL, "input": [item]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")
