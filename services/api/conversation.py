"""What the Responses and Messages endpoints share: one reply to a chat conversation, on the chat path.

Both APIs are translated into a :class:`ChatCompletionRequest` (one choice, no tools), rendered with the chat
template and queued exactly as ``/v1/chat/completions`` queues it, so every engine client serves them the same
way: a monolithic server, a decode pod, and the router (whose engine client runs the prefill->decode
orchestration of a disaggregated deployment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator

from pdserve.engine.outputs import CompletionOutput
from pdserve.services.api.engine_client import OutputStream
from pdserve.services.api.errors import ApiError, bad_request
from pdserve.services.api.protocol import ChatCompletionRequest
from pdserve.services.api.serving_chat import render_chat_async
from pdserve.services.api.serving_common import Prompt, ServingBase, new_id


def refuse_unsupported(extra: dict[str, Any] | None, ignored: frozenset[str]) -> None:
    """A 400 naming the first field that the request set and this server does not implement.

    ``extra``: the fields the request model did not declare; ``ignored``: those that change nothing about the
    answer (metadata, hints) and are accepted silently. Empty values (``[]``, ``{}``, ``null``) are no request.
    """
    for name, value in (extra or {}).items():
        if name in ignored or value in (None, [], {}, False):
            continue
        raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported")


@dataclass
class Reply:
    """A finished reply: its text, token counts and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None
    stop_reason: int | str | None


class ConversationServing(ServingBase):
    """Starts and collects one reply to a conversation given as a :class:`ChatCompletionRequest`."""

    async def begin(self, chat: ChatCompletionRequest, id_prefix: str) -> tuple[Prompt, OutputStream, str]:
        """Check, render and queue the conversation; returns its prompt, its engine stream (deltas when
        ``chat.stream``) and the request id."""
        self.check_common(chat)
        if len(chat.messages) > self.settings.max_messages:
            raise bad_request(f"at most {self.settings.max_messages} messages are allowed", param="messages")
        if self.engine.tokenizer is None:
            raise bad_request("this model has no tokenizer, so conversations are unavailable", param="messages")
        prompt = await render_chat_async(self.engine.tokenizer, chat.messages, True)
        params = self.sampling_params(chat, chat.max_tokens, None)
        request_id = new_id(id_prefix)
        (stream,) = self.start([prompt], params, request_id, chat.stream)
        return prompt, stream, request_id

    async def reply(self, prompt: Prompt, stream: OutputStream) -> Reply:
        """Wait for a non-streamed reply (under the request timeout; the stream is closed either way)."""
        cached = 0

        async def outputs() -> list[CompletionOutput]:
            nonlocal cached
            outs = []
            try:
                async for out in stream:
                    cached = max(cached, out.num_cached_tokens)
                    if out.outputs[0].finished:
                        outs.append(out.outputs[0])
            finally:
                stream.close()
            return outs

        outs = await self.with_timeout(outputs())
        if not outs:
            raise ApiError(500, "the engine ended the request without an answer", code="request_failed")
        comp = outs[0]
        return Reply(comp.text, len(prompt.token_ids), len(comp.token_ids), cached, comp.finish_reason,
                     comp.stop_reason)


async def deltas(stream: OutputStream, reply: Reply) -> AsyncIterator[str]:
    """The text deltas of a streamed reply, filling in ``reply`` (counts, finish reason) as they arrive."""
    async for out in stream:
        comp = out.outputs[0]
        reply.cached_tokens = max(reply.cached_tokens, out.num_cached_tokens)
        reply.completion_tokens += len(comp.token_ids)
        reply.text += comp.text
        if comp.finished:
            reply.finish_reason, reply.stop_reason = comp.finish_reason, comp.stop_reason
        if comp.text:
            yield comp.text
