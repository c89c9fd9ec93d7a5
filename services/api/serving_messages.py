"""``POST /v1/messages``: Anthropic's Messages API (text content blocks) on the chat path.

``system`` becomes a system turn, ``messages`` the conversation; it is rendered with the chat template. Errors
leave in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``), streaming sends Anthropic's
event sequence (``message_start``, ``content_block_start``, ``content_block_delta``..., ``content_block_stop``,
``message_delta`` with the stop reason and usage, ``message_stop``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.services.api.conversation import ConversationServing, Reply, deltas, refuse_unsupported
from pdserve.services.api.errors import ApiError
from pdserve.services.api.protocol import ChatCompletionRequest, ChatMessage
from pdserve.services.api.serving_common import GuardedEvents

# Anthropic's error "type" per HTTP status.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 504: "timeout_error"}


def anthropic_error_body(err: ApiError) -> dict[str, Any]:
    """An :class:`ApiError` in Anthropic's error shape (the offending field is named in the message)."""
    message = err.message if not err.param or err.param in err.message else f"{err.param}: {err.message}"
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(err.status, "api_error"), "message": message}}


class _Model(BaseModel):
    # extra="allow": undeclared fields are kept, so they can be refused by name.
    model_config = ConfigDict(strict=True, extra="allow")


class TextBlock(_Model):
    """A text content block (``cache_control`` and other block hints are accepted and ignored)."""

    type: Literal["text"]
    text: str


class Message(_Model):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class MessagesRequest(_Model):
    """``POST /v1/messages``."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


# Accepted and ignored: hints that change nothing about a text-only answer (prompt caching is automatic here).
IGNORED_FIELDS = frozenset({"service_tier", "cache_control", "inference_geo"})


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_events(err: ApiError) -> list[str]:
    return [_sse("error", anthropic_error_body(err))]


def _stop(reply: Reply) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for a finished reply."""
    if reply.finish_reason == "length":
        return "max_tokens", None
    if isinstance(reply.stop_reason, str):
        return "stop_sequence", reply.stop_reason
    return "end_turn", None


class MessagesServing(ConversationServing):
    """Builds Anthropic Message objects; ``create`` returns a dict, or an SSE event iterator when streaming."""

    async def create(self, req: MessagesRequest) -> dict[str, Any] | AsyncIterator[str]:
        refuse_unsupported(req.model_extra, IGNORED_FIELDS)
        self.check_model(req.model)
        turns = [ChatMessage(role=m.role, content=m.text()) for m in req.messages]
        if req.system is not None:
            system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
            turns.insert(0, ChatMessage(role="system", content=system))
        chat = ChatCompletionRequest(model=req.model, messages=turns, max_tokens=req.max_tokens,
                                     temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                     stop=req.stop_sequences, stream=req.stream)
        prompt, stream, _ = await self.begin(chat, "msg")
        message_id = f"msg_{uuid.uuid4().hex}"
        if not req.stream:
            reply = await self.reply(prompt, stream)
            reason, sequence = _stop(reply)
            return {**self._head(message_id, reply), "content": [{"type": "text", "text": reply.text}],
                    "stop_reason": reason, "stop_sequence": sequence}
        reply = Reply("", len(prompt.token_ids), 0, 0, None, None)
        return GuardedEvents(self._events(message_id, stream, reply), [stream], self.settings.request_timeout_s,
                             self.settings.retry_after_s, _error_events)

    def _head(self, message_id: str, reply: Reply) -> dict[str, Any]:
        return {"id": message_id, "type": "message", "role": "assistant", "model": self.model_name(),
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens,
                          "cache_read_input_tokens": reply.cached_tokens}}

    async def _events(self, message_id: str, stream: Any, reply: Reply) -> AsyncIterator[str]:
        yield _sse("message_start", {"type": "message_start", "message": self._head(message_id, reply)})
        yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        async for text in deltas(stream, reply):
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": text}})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        reason, sequence = _stop(reply)
        yield _sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                     "usage": {"output_tokens": reply.completion_tokens}})
        yield _sse("message_stop", {"type": "message_stop"})
