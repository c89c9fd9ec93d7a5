"""OpenAI request bodies, validated strictly: a wrong type is a 400 that names the field, never a guess.

Only what the server implements is declared; unknown fields are ignored (OpenAI clients send extras such as
``metadata``), except a few that would change the answer's meaning, which are refused (see ``unsupported``).
Responses are built as plain dicts in :mod:`.serving` (cheaper than models, and their shape is fixed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # strict: "5" is not an int and 1.0 is not an int; an int is still accepted where a float is expected.
    model_config = ConfigDict(strict=True, extra="ignore")


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
    user: str | None = None
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

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n and self.stream:
            return "best_of", "best_of cannot be combined with stream: the best candidates are known only at the end"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens 0 generates nothing: it is only allowed with echo (prompt scoring)"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Tool calling: an assistant turn's calls, and the call a tool turn answers (handed to the chat template).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


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
    best_of: int | None = None  # a completions parameter: refused here unless it equals n

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is only supported on /v1/completions"
        return super().unsupported()


class TokenizeRequest(_Strict):
    """``POST /tokenize``: either ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]
