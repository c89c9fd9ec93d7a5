"""Issue 14 acceptance, point 3: tool calling with the official ``openai`` client against a real ``pdserve serve``.

The bundled model is too small to decide on tool calls by itself, so ``auto`` is driven by a regex constraint
that makes it emit a call in each supported syntax (Hermes ``<tool_call>`` and Llama 3 JSON): what is tested is
that such output becomes OpenAI ``tool_calls``, streamed and not. Named and required calls are constrained by the
tools' schemas and validated with ``jsonschema``."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from api_servers import MODEL

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "celsius"\}\}'
          r'\n</tool_call>')
LLAMA = r'\{"name": "get_time", "parameters": \{\}\}'


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)


def test_named_tool_choice_always_gives_valid_arguments(client) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, n=4, temperature=0.8,
                                          max_tokens=40, tool_choice={"type": "function",
                                                                      "function": {"name": "get_weather"}})
    for choice in resp.choices:
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
        assert choice.message.content is None and choice.finish_reason == "stop"


def test_named_tool_choice_streamed(client) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=0.8,
                                            max_tokens=40, stream=True, tool_choice={
                                                "type": "function", "function": {"name": "get_weather"}})
    name, args = None, ""
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert name == "get_weather"
    jsonschema.validate(json.loads(args), WEATHER_PARAMS)


def test_required_calls_a_tool(client) -> None:
    # Seeded: at temperature 0.7 an unlucky draw can write a long string argument and run out of tokens.
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=0.7, seed=3,
                                          max_tokens=200, tool_choice="required")
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
        else:
            assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


@pytest.mark.parametrize("regex, name", [(HERMES, "get_weather"), (LLAMA, "get_time")])
def test_auto_parses_the_models_tool_call_syntax(client, regex, name) -> None:
    body = {"structured_outputs": {"regex": regex}}
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                                          temperature=0, max_tokens=100, extra_body=body)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == name
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=0,
                                            max_tokens=100, stream=True, extra_body=body)
    calls, content, finish = [], "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert [c.function.name for c in calls] == [name] and calls[0].index == 0
    assert calls[0].function.arguments == call.function.arguments  # greedy: the same call


def test_none_yields_text(client) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].message.content


def test_bad_tool_choice_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=5,
                                       tool_choice="required", extra_body={"guided_regex": "a"})
    assert info.value.body["message"] == "set at most one output constraint; got guided_regex, tool_choice"


def test_chat_template_receives_tools(tokenizer) -> None:
    from pdserve.services.api.protocol import ChatMessage
    from pdserve.services.api.serving_chat import render_chat

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                         "{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% endif %};{% endfor %}")
    messages = [ChatMessage(role="user", content="hi"),
                ChatMessage(role="assistant", content=None, tool_calls=[
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]),
                ChatMessage(role="tool", content="12:00", tool_call_id="c1")]
    prompt = render_chat(tok, messages, add_generation_prompt=False, tools=TOOLS)
    assert prompt.text == "[get_weather][get_time]user:hi;assistant:get_time;tool:12:00;"
