"""Request bodies of OpenAI's Responses API (``POST /v1/responses``), the text subset this server implements.

Fields that are declared here work; fields that are not are refused with a 400 naming them (tools, reasoning,
images, ...), except the few in :data:`IGNORED_FIELDS` that change nothing about the answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    # extra="allow": undeclared fields are kept, so they can be refused by name (conversation.refuse_unsupported).
    model_config = ConfigDict(strict=True, extra="allow")


class InputText(_Model):
    """A text part of an input message (``output_text``: an assistant turn replayed by the client)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Model):
    """One input item: a message. Other item types (function calls, images, ...) are not supported."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextFormat(_Model):
    type: Literal["text"]


class TextConfig(_Model):
    format: TextFormat | None = None


class ResponsesRequest(_Model):
    """``POST /v1/responses``."""

    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Tools are refused unless absent; "none" (or "auto" with no tools) asks for nothing.
    tool_choice: Literal["none", "auto"] | None = None
    truncation: Literal["disabled"] | None = None


# Accepted and ignored: hints that change nothing about the answer of a text-only, single-choice server.
IGNORED_FIELDS = frozenset({"parallel_tool_calls", "service_tier", "safety_identifier", "prompt_cache_key",
                            "stream_options"})


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as chat turns (role, content)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    return [{"role": m.role, "content": m.text()} for m in req.input]
