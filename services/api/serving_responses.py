"""``POST /v1/responses``: OpenAI's Responses API (text in, text out) on the chat path.

The conversation is ``instructions`` (as a system turn), then the stored conversation of
``previous_response_id`` (see :mod:`.response_store`), then ``input``; it is rendered with the chat template.
Streaming sends the Responses API's typed events (``response.created`` ... ``response.completed``), each as an
SSE ``event:`` line plus its JSON ``data:``, the way the official clients parse them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from pdserve.services.api.conversation import ConversationServing, Reply, deltas, refuse_unsupported
from pdserve.services.api.errors import ApiError, bad_request
from pdserve.services.api.protocol import ChatCompletionRequest, ChatMessage
from pdserve.services.api.response_store import ResponseStore
from pdserve.services.api.responses_protocol import IGNORED_FIELDS, ResponsesRequest, input_messages
from pdserve.services.api.serving_common import GuardedEvents


def _event(kind: str, seq: int, **fields: Any) -> str:
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


def _error_events(err: ApiError) -> list[str]:
    return [_event("error", 0, code=err.code or err.type, message=err.message, param=err.param)]


class ResponsesServing(ConversationServing):
    """Builds Response objects; ``create`` returns a dict, or an SSE event iterator when streaming."""

    def __init__(self, *args: Any, store_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = ResponseStore(store_size)

    def _conversation(self, req: ResponsesRequest) -> list[dict[str, Any]]:
        """The stored turns this request continues, then its input (without its instructions)."""
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            found = self.store.get(req.previous_response_id)
            if found is None:
                raise ApiError(404, f"no stored response with id {req.previous_response_id!r} (unknown, stored "
                               "with store=false, or evicted from this server's bounded store)",
                               param="previous_response_id", code="response_not_found")
            history = found
        return history + input_messages(req)

    async def create(self, req: ResponsesRequest) -> dict[str, Any] | AsyncIterator[str]:
        refuse_unsupported(req.model_extra, IGNORED_FIELDS)
        self.check_model(req.model)
        conversation = self._conversation(req)
        if not req.input:
            raise bad_request("input must not be empty", param="input")
        turns = ([{"role": "system", "content": req.instructions}] if req.instructions is not None else [])
        chat = ChatCompletionRequest(
            model=req.model, messages=[ChatMessage(**t) for t in turns + conversation],
            max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p, stream=req.stream,
            user=req.user)
        prompt, stream, _ = await self.begin(chat, "resp")
        response_id = f"resp_{uuid.uuid4().hex}"
        head = self._head(req, response_id)
        if not req.stream:
            reply = await self.reply(prompt, stream)
            self._remember(req, response_id, conversation, reply)
            return self._finished(head, reply)
        reply = Reply("", len(prompt.token_ids), 0, 0, None, None)
        events = self._events(req, head, conversation, stream, reply)
        return GuardedEvents(events, [stream], self.settings.request_timeout_s, self.settings.retry_after_s,
                             _error_events)

    def _remember(self, req: ResponsesRequest, response_id: str, conversation: list[dict[str, Any]],
                  reply: Reply) -> None:
        if req.store:
            self.store.put(response_id, conversation + [{"role": "assistant", "content": reply.text}])

    def _head(self, req: ResponsesRequest, response_id: str) -> dict[str, Any]:
        """The Response object as it starts: everything but its output, status and usage."""
        return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "error": None, "incomplete_details": None, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "model": self.model_name(), "output": [],
                "parallel_tool_calls": False, "previous_response_id": req.previous_response_id,
                "temperature": req.temperature, "top_p": req.top_p, "tool_choice": "none", "tools": [],
                "store": req.store, "text": {"format": {"type": "text"}}, "truncation": "disabled",
                "metadata": req.metadata or {}, "user": req.user, "usage": None}

    @staticmethod
    def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def _finished(self, head: dict[str, Any], reply: Reply, item_id: str | None = None) -> dict[str, Any]:
        complete = reply.finish_reason != "length"
        status = "completed" if complete else "incomplete"
        usage = {"input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": reply.cached_tokens},
                 "output_tokens": reply.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        return {**head, "status": status, "incomplete_details": None if complete else {"reason": "max_output_tokens"},
                "output": [self._message(item_id or f"msg_{uuid.uuid4().hex}", reply.text, status)],
                "usage": usage}

    async def _events(self, req: ResponsesRequest, head: dict[str, Any], conversation: list[dict[str, Any]],
                      stream: Any, reply: Reply) -> AsyncIterator[str]:
        seq = iter(range(1 << 62))
        item_id = f"msg_{uuid.uuid4().hex}"
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield _event("response.created", next(seq), response=head)
        yield _event("response.in_progress", next(seq), response=head)
        yield _event("response.output_item.added", next(seq), output_index=0,
                     item=self._message(item_id, "", "in_progress") | {"content": []})
        yield _event("response.content_part.added", next(seq), **where,
                     part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        async for text in deltas(stream, reply):
            yield _event("response.output_text.delta", next(seq), **where, delta=text, logprobs=[])
        final = self._finished(head, reply, item_id)
        item = final["output"][0]
        yield _event("response.output_text.done", next(seq), **where, text=reply.text, logprobs=[])
        yield _event("response.content_part.done", next(seq), **where, part=item["content"][0])
        yield _event("response.output_item.done", next(seq), output_index=0, item=item)
        self._remember(req, head["id"], conversation, reply)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        yield _event(kind, next(seq), response=final)
