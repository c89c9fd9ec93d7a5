"""OpenAI request bodies, validated strictly: a wrong type is a 400 that names the field, never a guess.

Only what the server implements (or accepts as purely informational) is declared: :mod:`.fields` classifies every
field, and a field that is refused or unknown is a 400 naming it before the model validates anything else.
Responses are built as plain dicts in the ``serving_*`` modules (cheaper than models, and their shape is fixed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdserve.services.api.errors import bad_request
from pdserve.services.api.fields import CHAT_FIELDS, COMPLETION_FIELDS, check_fields


class _Strict(BaseModel):
    # strict: "5" is not an int and 1.0 is not an int; an int is still accepted where a float is expected.
    # forbid: a key a nested object does not know is a 400 naming it, not a silent default.
    model_config = ConfigDict(strict=True, extra="forbid")


class JsonSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``. The schema is enforced whether or not ``strict`` is set."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" is taken by pydantic's BaseModel; the JSON key stays "schema".
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Strict):
    """The parameters shared by completions and chat (OpenAI's plus the usual vLLM extensions)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # informational (fields.py): accepted, ignored
    # OpenAI's {"token id": bias in [-100, 100]} (at most 300 entries), vLLM's allowed_token_ids and bad_words
    # (engine/logits_processors.py).
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Disaggregation (a pdserve extension, named as vLLM names it): on a decode pod, the transfer handle a prefill
    # pod returned for this prompt; its KV is loaded instead of computed. A prefill pod returns one in responses.
    kv_transfer_params: dict[str, Any] | None = None
    # Per-tenant prefix-cache isolation (as vLLM): mixed into the first block's hash, so requests with different
    # salts never share cached KV.
    cache_salt: str | None = None
    disable_speculation: bool | None = None  # opt out of speculative decoding (an engine flag)
    # Structured output (see services/api/structured.py): OpenAI's response_format, vLLM's structured_outputs
    # object ({"json" | "regex" | "choice" | "grammar" | "json_object": ...}) and its older guided_* names.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a requested feature this server does not implement."""
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.kv_transfer_params is not None and self.n != 1:
            return "kv_transfer_params", "a KV transfer handle belongs to one sequence: n must be 1"
        return None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    # Generate best_of candidates, return the n with the highest cumulative logprob (not with streaming).
    best_of: int | None = None
    # vLLM's extension: every prompt token's logprob and top-k, as the choice's "prompt_logprobs" (echo with
    # logprobs also computes them, for the legacy logprobs object).
    prompt_logprobs: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        check_fields(data, COMPLETION_FIELDS, "/v1/completions")
        return data

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n and self.stream:
            return "best_of", "best_of cannot be combined with stream: the best candidates are known only at the end"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens 0 generates nothing: it is only allowed with echo (prompt scoring)"
        return super().unsupported()


# The content-part types of OpenAI's messages that carry text; the others (image_url, input_audio, file) are
# refused by name: the models served here read text only.
TEXT_PART_KEYS = {"text": "text", "refusal": "refusal"}


def check_parts(content: Any, where: str) -> None:
    """400 naming the part when a message's content list holds a part this server cannot take."""
    if not isinstance(content, list):
        return
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PART_KEYS:
            what = f"of type {kind!r} are" if isinstance(kind, str) else "without a string 'type' are"
            raise bad_request(f"{where}.content[{j}]: content parts {what} not supported: this server's models "
                              "read text only (parts of type 'text')", param="messages", code="unsupported")
        key = TEXT_PART_KEYS[kind]
        # prompt_cache_breakpoint: OpenAI's prompt-cache hint, informational here (the prefix cache is automatic)
        if not ({"type", key} <= set(part) <= {"type", key, "prompt_cache_breakpoint"}) \
                or not isinstance(part[key], str):
            raise bad_request(f"{where}.content[{j}]: a {kind!r} part is {{'type': {kind!r}, {key!r}: string}}",
                              param="messages")


class ChatMessage(_Strict):
    """One turn. ``content`` is a string or a list of text parts (``{"type": "text", "text": ...}``)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # Tool calling: an assistant turn's calls, and the call a tool turn answers (handed to the chat template).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # An earlier assistant turn's reasoning (what the reasoning parser split off), for templates that render it.
    reasoning_content: str | None = None
    # An earlier assistant turn's refusal: the text of that turn when it has no content.
    refusal: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_parts(data.get("content"), "messages")
        return data

    def text(self) -> str:
        """The turn's text: its content (text parts joined), or its refusal when it has no content."""
        if self.content is None or self.content == []:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part[TEXT_PART_KEYS[part["type"]]] for part in self.content)


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    # Tool calling (services/api/tools.py): OpenAI function tools; "none", "auto", "required" or a named function.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # False: at most one tool call per answer
    modalities: list[Literal["text"]] | None = None  # "audio" is refused by the type
    # Passed to the chat template as variables (vLLM's names): e.g. {"enable_thinking": false} for Qwen3, and the
    # effort as ``reasoning_effort`` for templates that read it.
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal[REASONING_EFFORTS] | None = None  # type: ignore[valid-type]
    # Informational (fields.py): accepted and ignored, they cannot change the answer.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        check_fields(data, CHAT_FIELDS, "/v1/chat/completions")
        messages = data.get("messages") if isinstance(data, dict) else None
        for i, m in enumerate(messages if isinstance(messages, list) else []):
            if isinstance(m, dict):
                check_parts(m.get("content"), f"messages[{i}]")
        return data


class TokenizeRequest(_Strict):
    """``POST /tokenize``: either ``prompt`` or chat ``messages``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    """``POST /detokenize``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    tokens: list[int]
