"""Issue 13 (C), point 3: no request field is silently ignored.

Every field of OpenAI's chat/completions and completions request schemas (read from the installed ``openai``
package) and every vLLM extension the server accepts is sent, one at a time, with the official client to a real
``pdserve serve``. What must happen comes from the one table, ``services/api/fields.py``: an implemented or
informational field answers 200 (implemented ones spot-checked where one request shows it), a refused one is a
400 naming it. A field that appears in the ``openai`` package but not in the table fails the test, and so does a
table entry without a case here.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from api_servers import MODEL
from pdserve.services.api.fields import CHAT_FIELDS, COMPLETION_FIELDS, Handling

# Tools without arguments: a forced call is a handful of tokens.
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_date", "parameters": NO_ARGS}},
         {"type": "function", "function": {"name": "get_time", "parameters": NO_ARGS}}]


def openai_fields(module: Any) -> set[str]:
    """The request fields the ``openai`` package sends (its streaming variant adds ``stream``)."""
    return set(module.CompletionCreateParamsBase.__annotations__) | set(
        module.CompletionCreateParamsStreaming.__annotations__)


@dataclass
class Case:
    """One field's value; ``extra``: what else the request needs; ``check``: a spot check of a 200."""

    value: Any
    extra: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None
    status: int | None = None  # the expected status when the table's handling does not decide it


def _text(resp: Any) -> str:
    c = resp.choices[0]
    return c.message.content if hasattr(c, "message") else c.text


def _chunks_have_usage(chunks: list) -> None:
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def _one_tool_call(resp: Any) -> None:
    assert len(resp.choices[0].message.tool_calls) == 1


STOP_TOKEN = 28  # "," in SmolLM2's vocabulary: a stop token id the model may well produce

COMMON: dict[str, Case] = {
    "model": Case(MODEL),
    "n": Case(2, check=lambda r: sorted(c.index for c in r.choices) == [0, 1] or pytest.fail("n")),
    "temperature": Case(0.0),
    "top_p": Case(0.5),
    "seed": Case(7, {"temperature": 1.0}),
    "stop": Case(["\n"], check=lambda r: "\n" not in _text(r) or pytest.fail("stop")),
    "presence_penalty": Case(0.5),
    "frequency_penalty": Case(0.5),
    "stream": Case(True, check=lambda chunks: len(chunks) >= 1 or pytest.fail("stream")),
    "stream_options": Case({"include_usage": True}, {"stream": True}, check=_chunks_have_usage),
    "max_tokens": Case(1, check=lambda r: r.usage.completion_tokens == 1 or pytest.fail("max_tokens")),
    "logit_bias": Case({"42": 5.0}),
    "user": Case("user-1"),
    "top_k": Case(5),
    "min_p": Case(0.1),
    "stop_token_ids": Case([STOP_TOKEN]),
    "repetition_penalty": Case(1.2),
    "ignore_eos": Case(True, {"max_tokens": 4},
                       check=lambda r: r.usage.completion_tokens == 4 or pytest.fail("ignore_eos")),
    "min_tokens": Case(3, {"max_tokens": 3},
                       check=lambda r: r.usage.completion_tokens == 3 or pytest.fail("min_tokens")),
    "skip_special_tokens": Case(False),
    "include_stop_str_in_output": Case(True, {"stop": ["e"], "max_tokens": 8}),
    # A handle for a KV connector this monolithic server does not have: honoured means refused by name.
    "kv_transfer_params": Case({"prefill_pod": "p", "request_id": "r"}, status=400),
    "cache_salt": Case("tenant-1"),
    "disable_speculation": Case(True),  # this server does not speculate: opting out changes nothing
    "allowed_token_ids": Case([STOP_TOKEN], {"max_tokens": 2}),
    "bad_words": Case(["the"]),
    # Constraints share their specs where they can: the engine compiles each spec once (a slow step on a CPU).
    "response_format": Case({"type": "json_schema", "json_schema": {"name": "n", "schema": {"enum": ["up", "down"]}}},
                            {"max_tokens": 5}, check=lambda r: _text(r) in ('"up"', '"down"') or pytest.fail("rf")),
    "guided_json": Case({"enum": ["up", "down"]}, {"max_tokens": 5},
                        check=lambda r: _text(r) in ('"up"', '"down"') or pytest.fail("guided_json")),
    "structured_outputs": Case({"choice": ["up", "down"]}, {"max_tokens": 5},
                               check=lambda r: _text(r) in ("up", "down") or pytest.fail("structured_outputs")),
    "guided_choice": Case(["up", "down"], {"max_tokens": 5},
                          check=lambda r: _text(r) in ("up", "down") or pytest.fail("guided_choice")),
    "guided_regex": Case("(up|down)", {"max_tokens": 5},
                         check=lambda r: re.fullmatch("up|down", _text(r)) or pytest.fail("guided_regex")),
    "guided_grammar": Case('root ::= "up" | "down"', {"max_tokens": 5},
                           check=lambda r: _text(r) in ("up", "down") or pytest.fail("guided_grammar")),
}

CHAT: dict[str, Case] = {
    **COMMON,
    "messages": Case([{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]),
    "max_completion_tokens": Case(1, {"max_tokens": 3},
                                  check=lambda r: r.usage.completion_tokens == 1 or pytest.fail("mct")),
    "logprobs": Case(True, check=lambda r: r.choices[0].logprobs.content or pytest.fail("logprobs")),
    "top_logprobs": Case(2, {"logprobs": True},
                         check=lambda r: len(r.choices[0].logprobs.content[0].top_logprobs) == 2 or pytest.fail("tl")),
    "tools": Case(TOOLS),
    "tool_choice": Case({"type": "function", "function": {"name": "get_time"}}, {"tools": TOOLS, "max_tokens": 8},
                        check=lambda r: r.choices[0].message.tool_calls[0].function.name == "get_time"
                        or pytest.fail("tool_choice")),
    "parallel_tool_calls": Case(False, {"tools": TOOLS, "tool_choice": "required", "max_tokens": 30},
                                check=_one_tool_call),
    "modalities": Case(["text"]),
    "reasoning_effort": Case("low"),  # what the template receives: test_chat_template.py
    "audio": Case({"voice": "alloy", "format": "wav"}),
    "function_call": Case("auto"),
    "functions": Case([{"name": "f", "parameters": NO_ARGS}]),
    "moderation": Case({"model": "omni-moderation-latest"}),
    "verbosity": Case("low"),
    "web_search_options": Case({}),
    "metadata": Case({"team": "a"}),
    "store": Case(False),
    "service_tier": Case("auto"),
    "safety_identifier": Case("hashed-user"),
    "prompt_cache_key": Case("conversation-1"),
    "prompt_cache_retention": Case("in_memory"),
    "prompt_cache_options": Case({"mode": "implicit"}),
    "prediction": Case({"type": "content", "content": "Hello"}),
    "add_generation_prompt": Case(False),
    "chat_template_kwargs": Case({"unused_variable": 1}),  # rendering with it: test_chat_template.py
}

COMPLETION: dict[str, Case] = {
    **COMMON,
    "prompt": Case(["Hello", "Goodbye"], check=lambda r: len(r.choices) == 2 or pytest.fail("prompt")),
    "echo": Case(True, check=lambda r: r.choices[0].text.startswith("The sky") or pytest.fail("echo")),
    "logprobs": Case(2, check=lambda r: len(r.choices[0].logprobs.top_logprobs[0]) == 2 or pytest.fail("lp")),
    "best_of": Case(2),
    "prompt_logprobs": Case(1),
    "suffix": Case("The end."),
}


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0, timeout=300)


def test_the_table_classifies_every_openai_field_and_each_has_a_case() -> None:
    assert openai_fields(chat_params) - set(CHAT_FIELDS) == set(), "classify the new fields in fields.py"
    assert openai_fields(completion_params) - set(COMPLETION_FIELDS) == set(), "classify them in fields.py"
    assert set(CHAT) == set(CHAT_FIELDS)
    assert set(COMPLETION) == set(COMPLETION_FIELDS)


def _send(create: Callable[..., Any], schema: set[str], base: dict[str, Any], name: str, case: Case) -> Any:
    """One request as a user would write it: OpenAI's fields as arguments, the extensions in ``extra_body``."""
    body = {**base, **case.extra, name: case.value}
    kwargs = {k: v for k, v in body.items() if k in schema}
    extra = {k: v for k, v in body.items() if k not in schema}
    resp = create(**kwargs, extra_body=extra or None)
    return list(resp) if body.get("stream") else resp


def _outcome(name: str, handling: Handling, case: Case, send: Callable[[], Any]) -> str | None:
    """None when the field behaved as the table says, else what went wrong."""
    status = case.status or (400 if handling is Handling.REFUSED else 200)
    start = time.monotonic()
    try:
        resp = send()
    except openai.APITimeoutError:
        return f"{name}: no answer in {time.monotonic() - start:.0f} s"
    except openai.BadRequestError as exc:
        if status == 400 and exc.body.get("param") == name:
            return None
        return f"{name}: {exc.body}"
    if status == 400:
        return f"{name}: answered 200, expected a 400 naming it"
    try:
        if case.check is not None:
            case.check(resp)
    except BaseException as exc:  # pytest.fail raises an exception outside the Exception tree
        return f"{name}: spot check failed ({exc}): {resp}"
    return None


def _all_fields(create: Callable[..., Any], schema: set[str], base: dict[str, Any], table: dict[str, Handling],
                cases: dict[str, Case]) -> list[str]:
    """Every case at once (the engine batches them: far quicker than one after another); the failures."""
    def one(name: str) -> str | None:
        return _outcome(name, table[name], cases[name], lambda: _send(create, schema, base, name, cases[name]))

    with ThreadPoolExecutor(16) as pool:
        return [f for f in pool.map(one, sorted(cases)) if f is not None]


def test_every_chat_field(client) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
    assert _all_fields(client.chat.completions.create, openai_fields(chat_params), base, CHAT_FIELDS, CHAT) == []


def test_every_completion_field(client) -> None:
    base = {"model": MODEL, "prompt": "The sky is", "max_tokens": 2}
    assert _all_fields(client.completions.create, openai_fields(completion_params), base, COMPLETION_FIELDS,
                       COMPLETION) == []


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_unknown_fields_are_refused_by_name(client, endpoint: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                           extra_body={"use_beam_search": True})
        else:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body={"use_beam_search": True})
    assert info.value.body["param"] == "use_beam_search"
    assert info.value.body["code"] == "unknown_field"


def test_unknown_nested_keys_are_refused_by_name(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi", "colour": "red"}],
                                       max_tokens=1)
    assert info.value.body["param"] == "messages.0.colour"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, stream=True,
                                  stream_options={"include_usage": True, "every_chunk": True})
    assert info.value.body["param"] == "stream_options.every_chunk"
