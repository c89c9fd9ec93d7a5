"""Tool calling's pure parts, exactly: ``tools`` / ``tool_choice`` planning and the ``auto`` parser, whole and
streamed delta by delta (every split of the text gives the same content and calls)."""

from __future__ import annotations

import json

import pytest

from pdserve.services.api.errors import ApiError
from pdserve.services.api.tools import ToolCallParser, calls_of_constrained, parse_tool_calls, plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = frozenset({"get_weather", "get_time"})


def test_plans() -> None:
    assert plan_tools(None, None).mode == "none"
    assert plan_tools([WEATHER], None).mode == "auto"
    assert plan_tools([WEATHER], "none").constraint is None
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert (named.mode, named.constraint) == ("named", {"json": WEATHER["function"]["parameters"]})
    required = plan_tools([WEATHER, TIME], "required")
    items = required.constraint["json"]["items"]["anyOf"]
    assert [i["properties"]["name"] for i in items] == [{"const": "get_time"}, {"const": "get_weather"}]
    assert items[0]["properties"]["arguments"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize("tools, choice, param, message", [
    (None, "required", "tool_choice", "tool_choice needs tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice",
     "tool_choice names 'nope', which is not among the tools"),
    ([WEATHER], "sometimes", "tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                            "{'type': 'function', 'function': {'name': ...}}"),
    ([WEATHER, WEATHER], "auto", "tools", "tools: the function name 'get_weather' appears twice"),
    ([{"type": "retrieval"}], "auto", "tools", "tools[0] must be {'type': 'function', 'function': {...}}"),
])
def test_bad_tools_are_400(tools, choice, param, message) -> None:
    with pytest.raises(ApiError) as info:
        plan_tools(tools, choice)
    assert (info.value.status, info.value.param, info.value.message) == (400, param, message)


def test_constrained_answers_become_calls() -> None:
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    (call,) = calls_of_constrained(named, '{"city":"Paris"}')
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    required = plan_tools([WEATHER, TIME], "required")
    calls = calls_of_constrained(required, '[{"name":"get_time","arguments":{}},'
                                           '{"name":"get_weather","arguments":{"city":"Rome"}}]')
    assert [(c.name, c.arguments) for c in calls] == [("get_time", "{}"), ("get_weather", '{"city": "Rome"}')]
    assert calls_of_constrained(named, '{"city":"Par') == []  # cut by max_tokens: stays text


HERMES = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("text, content, calls", [
    (HERMES, "Let me check.", [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", '{"city": "Oslo"}')]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', "", [("get_time", "{}")]),
    ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', '<tool_call>{"name": "unknown", '
                                                                    '"arguments": {}}</tool_call>', []),
    ("The weather is nice. <tool_", "The weather is nice. <tool_", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON that is no call stays text
    ("<b>bold</b>", "<b>bold</b>", []),
])
def test_auto_parser_whole_and_streamed(text, content, calls) -> None:
    got_content, got_calls = parse_tool_calls(text, NAMES)
    assert (got_content, [(c.name, c.arguments) for c in got_calls]) == (content, calls)
    for step in (1, 3, 7):
        parser = ToolCallParser(NAMES)
        streamed, streamed_calls = "", []
        for i in range(0, len(text), step):
            c, k = parser.feed(text[i:i + step])
            streamed += c
            streamed_calls += k
        c, k = parser.finish()
        streamed += c
        streamed_calls += k
        assert [(c.name, c.arguments) for c in streamed_calls] == calls
        assert streamed.strip() == content.strip()
