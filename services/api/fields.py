"""Every request field of ``/v1/chat/completions`` and ``/v1/completions``, classified in one place.

No field is silently ignored. Each one a client may send is

* ``IMPLEMENTED``: declared on the request model in :mod:`.protocol` and honoured;
* ``INFORMATIONAL``: declared and accepted, but it cannot change the answer this server gives (``user``,
  ``metadata``, ``store``, billing and caching hints...), so it is dropped; the list is documented in
  ``docs/serving.md``;
* ``REFUSED``: a 400 that names it (``code: "unsupported"``) whenever it is set to anything but ``null``.

A field in neither table is unknown: a 400 naming it (``code: "unknown_field"``). OpenAI's fields are all listed
(a test compares the tables with the installed ``openai`` package, so a new field there fails until it is
classified here), then the vLLM extensions this server implements.

A field that is declared on the model but refused for some values (``suffix``) is checked by ``unsupported()``
on the request model; it is ``REFUSED`` here.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping

from pdserve.services.api.errors import ApiError


class Handling(enum.Enum):
    IMPLEMENTED = "implemented"
    INFORMATIONAL = "accepted, ignored"
    REFUSED = "refused"


IMPL, INFO, REFUSE = Handling.IMPLEMENTED, Handling.INFORMATIONAL, Handling.REFUSED

# Why each refused field is refused (the 400's message).
REFUSAL_REASONS: dict[str, str] = {
    "audio": "audio output is not supported: this server generates text only",
    "function_call": "the deprecated function_call is not supported; use tool_choice",
    "functions": "the deprecated functions are not supported; use tools",
    "suffix": "suffix (insertion) is not supported",
    "moderation": "moderation is not supported by this server",
    "verbosity": "verbosity is not supported: no model served here takes it",
    "web_search_options": "web search is not supported by this server",
}


def _all(handling: Handling, names: str) -> dict[str, Handling]:
    return {name: handling for name in names.split()}


# Fields shared by both endpoints (OpenAI's first, then the vLLM extensions).
_COMMON: dict[str, Handling] = {
    **_all(IMPL, "model n temperature top_p seed stop presence_penalty frequency_penalty stream stream_options "
                 "max_tokens logprobs logit_bias"),
    **_all(INFO, "user"),
    # vLLM extensions
    **_all(IMPL, "top_k min_p stop_token_ids repetition_penalty ignore_eos min_tokens skip_special_tokens "
                 "include_stop_str_in_output kv_transfer_params cache_salt response_format structured_outputs "
                 "guided_json guided_regex guided_choice guided_grammar disable_speculation allowed_token_ids "
                 "bad_words"),
}

CHAT_FIELDS: dict[str, Handling] = {
    **_COMMON,
    **_all(IMPL, "messages max_completion_tokens top_logprobs tools tool_choice parallel_tool_calls modalities "
                 "reasoning_effort"),
    **_all(REFUSE, "audio function_call functions moderation verbosity web_search_options"),
    # They do not change this server's answer: a store for later retrieval, tags, billing tiers, abuse-tracking
    # ids, routing hints for OpenAI's own prompt cache (this server's prefix cache is automatic), and a prediction
    # that only speeds OpenAI's decoding up (the output does not depend on it).
    **_all(INFO, "metadata store service_tier safety_identifier prompt_cache_key prompt_cache_retention "
                 "prompt_cache_options prediction"),
    # vLLM extensions
    **_all(IMPL, "add_generation_prompt chat_template_kwargs"),
}

COMPLETION_FIELDS: dict[str, Handling] = {
    **_COMMON,
    **_all(IMPL, "prompt echo best_of prompt_logprobs"),
    **_all(REFUSE, "suffix"),
}


def check_fields(data: Any, table: Mapping[str, Handling], endpoint: str) -> None:
    """400 naming the first field of a request body that is refused (and set) or unknown to ``table``."""
    if not isinstance(data, dict):
        return  # the model reports the wrong type
    for name, value in data.items():
        handling = table.get(name)
        if handling is None:
            raise ApiError(400, f"unknown field {name!r} for {endpoint}: this server refuses fields it does not "
                           "implement (docs/serving.md lists them)", param=name, code="unknown_field")
        if handling is Handling.REFUSED and value is not None and name not in _CHECKED_BY_VALUE:
            raise ApiError(400, REFUSAL_REASONS[name], param=name, code="unsupported")


# Refused only for some values (the request model's ``unsupported()`` decides), so let through here.
_CHECKED_BY_VALUE = frozenset({"suffix"})
