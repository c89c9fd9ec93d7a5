"""``POST /v1/chat/completions``: a conversation, rendered with the tokenizer's chat template, to a reply."""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from pdserve.engine.frontend.tokenizer import apply_chat_template, off_loop
from pdserve.engine.outputs import CompletionOutput, Logprob
from pdserve.engine.sampling_params import is_valid_text
from pdserve.services.api import request_timing
from pdserve.services.api.engine_client import OutputStream
from pdserve.services.api.errors import bad_request
from pdserve.services.api.protocol import ChatCompletionRequest, ChatMessage
from pdserve.services.api.reasoning import ReasoningSplitter, opens_reasoning, split_reasoning
from pdserve.services.api.tools import ChoiceStream, ToolPlan, finish_reason, message_of, plan_tools
from pdserve.services.api.structured import structured_outputs_async
from pdserve.services.api.serving_common import (DONE, GuardedEvents, Prompt, ServingBase, Usage,
                                                 merge_streams, new_id, sse, usage_chunks)


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call of an earlier assistant turn as templates read it: OpenAI sends ``arguments`` as JSON text,
    templates (Qwen, Hermes, Llama 3) render ``arguments`` as an object, so valid JSON objects are decoded."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}} if isinstance(args, dict) else call


def _turn(i: int, m: ChatMessage) -> dict[str, Any]:
    if m.role == "tool" and m.tool_call_id is None:
        raise bad_request(f"messages[{i}]: a tool message needs tool_call_id (the call it answers)",
                          param="messages")
    if m.tool_calls is not None and m.role != "assistant":
        raise bad_request(f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
    turn: dict[str, Any] = {"role": m.role, "content": m.text()}
    for key in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, key) is not None:
            turn[key] = getattr(m, key)
    if m.tool_calls is not None:
        turn["tool_calls"] = [_template_call(c) for c in m.tool_calls]
    return turn


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                chat_template: str | None = None) -> Prompt:
    """The prompt that the model sees for a conversation (the same rendering as the offline ``LLM.chat``), with
    the tool definitions and the request's template variables handed to the template (``chat_template``, when
    set, replaces the tokenizer's)."""
    conv = [_turn(i, m) for i, m in enumerate(messages)]
    if not all(is_valid_text(m["content"]) for m in conv):
        raise bad_request("a message is not valid Unicode text (it holds a lone surrogate)", param="messages")
    try:
        text = apply_chat_template(tokenizer, conv, add_generation_prompt, tools, template_kwargs, chat_template)
    except ValueError as exc:
        param = "chat_template_kwargs" if "template keywords" in str(exc) else "messages"
        raise bad_request(str(exc), param=param) from None
    except Exception as exc:  # the template itself failed (jinja's raise_exception, a missing variable)
        raise bad_request(f"the chat template failed on these messages: {exc}", param="messages") from None
    return Prompt(list(tokenizer(text, add_special_tokens=False).input_ids), text)


async def render_chat_async(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                            tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                            chat_template: str | None = None) -> Prompt:
    """:func:`render_chat`, off the event loop for a long conversation."""
    size = sum(len(m.text()) for m in messages)
    return await off_loop(render_chat, tokenizer, messages, add_generation_prompt, tools, template_kwargs,
                          chat_template, size=size)


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    """The request's chat template variables: ``chat_template_kwargs``, and ``reasoning_effort`` under its own
    name (as vLLM passes it; templates that know it, e.g. gpt-oss's, read it)."""
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    for key in kwargs:
        if not key.isidentifier():
            raise bad_request(f"chat_template_kwargs: {key!r} is not a template variable name",
                              param="chat_template_kwargs")
    return kwargs


class ChatChoiceStream:
    """One streamed choice's text deltas as chat ``delta`` objects: ``reasoning_content`` split off first (when a
    reasoning parser is on), then content and ``tool_calls`` for the tool plan."""

    def __init__(self, plan: ToolPlan, splitter: ReasoningSplitter | None) -> None:
        self.tools = ChoiceStream(plan)
        self.splitter = splitter

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        reasoning = ""
        if self.splitter is not None:
            reasoning, text = self.splitter.feed(text)
            if final:
                more_reasoning, more_text = self.splitter.finish()
                reasoning, text = reasoning + more_reasoning, text + more_text
        delta = self.tools.delta(text, final)
        return {"reasoning_content": reasoning, **delta} if reasoning else delta


class ChatServing(ServingBase):
    """Builds chat completion responses; ``create`` returns a dict, or an SSE event iterator when streaming."""

    async def create(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_common(req)
        if len(req.messages) > self.settings.max_messages:
            raise bad_request(f"at most {self.settings.max_messages} messages are allowed", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if self.engine.tokenizer is None:
            raise bad_request("this model has no tokenizer, so chat is unavailable", param="messages")
        plan = plan_tools(req.tools, req.tool_choice, parallel=req.parallel_tool_calls is not False)
        prompt = await render_chat_async(self.engine.tokenizer, req.messages, req.add_generation_prompt,
                                         plan.template_tools, template_kwargs(req), self.settings.chat_template)
        tool_constraint = ("tool_choice", plan.constraint) if plan.constraint is not None else None
        structured = await structured_outputs_async(req, tool_constraint)
        params = self.sampling_params(req, max_tokens, logprobs, structured)
        handle = self.transfer_handle(req)
        request_id, created = new_id("chatcmpl"), int(time.time())
        streams = self.start([prompt], params, request_id, req.stream, handle)
        if req.stream:
            events = self._events(req, prompt, streams, request_id, created, plan)
            return GuardedEvents(events, streams, self.settings.request_timeout_s, self.settings.retry_after_s)
        handles: list[dict | None] = []
        cached = self.cached_tokens()
        timelines: list[dict] = []
        (outs,) = await self.collect(streams, handles, cached, timelines if request_timing.wanted() else None)
        self.check_transfer_outcome(outs, handle is not None)
        usage = Usage(prompt_tokens=len(prompt.token_ids), completion_tokens=sum(len(c.token_ids) for c in outs),
                      cached_tokens=cached.total)
        choices = []
        for c in outs:
            reasoning, text = self._split(prompt, c.text)
            message, calls = message_of(plan, text)
            if self.settings.reasoning_parser is not None:
                message["reasoning_content"] = reasoning
            choices.append({"index": c.index, "message": message,
                            "logprobs": self._logprobs(c.logprobs) if req.logprobs else None,
                            "finish_reason": finish_reason(plan, c.finish_reason, calls),
                            "stop_reason": c.stop_reason})
        body = {"id": request_id, "object": "chat.completion", "created": created, "model": self.model_name(),
                "choices": choices, "usage": usage.as_dict()}
        if handles[0] is not None:
            body["kv_transfer_params"] = handles[0]  # a prefill pod's: where a decode pod loads this KV from
        request_timing.publish(body, timelines[0] if timelines else None)
        return body

    def _split(self, prompt: Prompt, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a whole answer: no reasoning without a reasoning parser."""
        if self.settings.reasoning_parser is None:
            return None, text
        return split_reasoning(text, opens_reasoning(prompt.text))

    def _splitter(self, prompt: Prompt) -> ReasoningSplitter | None:
        if self.settings.reasoning_parser is None:
            return None
        return ReasoningSplitter(opens_reasoning(prompt.text))

    async def _events(self, req: ChatCompletionRequest, prompt: Prompt, streams: list[OutputStream],
                      request_id: str, created: int, plan: ToolPlan) -> AsyncIterator[str]:
        include_usage, continuous = usage_chunks(req)
        cached = self.cached_tokens()
        usage = Usage(prompt_tokens=len(prompt.token_ids), cached_tokens=cached.total)
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name()}
        # OpenAI sends the role first, in a chunk of its own, for every choice.
        for index in range(req.n):
            chunk = {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            yield sse({**chunk, "usage": usage.as_dict()} if continuous else chunk)
        choice_streams = {index: ChatChoiceStream(plan, self._splitter(prompt)) for index in range(req.n)}
        timeline = None
        async for _, out in merge_streams(streams):
            comp = out.outputs[0]
            if comp.finished and timeline is None and request_timing.wanted():
                timeline = request_timing.timeline_of(out, self.engine)
            usage.completion_tokens += len(comp.token_ids)
            cached.add(0, out)
            usage.cached_tokens = cached.total
            if not comp.text and not comp.finished and not comp.logprobs:
                continue
            chunk = {**head, "choices": [self._delta(comp, req.logprobs, choice_streams[comp.index])]}
            yield sse({**chunk, "usage": usage.as_dict()} if continuous else chunk)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage.as_dict()})
        if timeline is not None:
            yield sse({**head, "choices": [], "pdserve_timing": timeline})
        yield DONE

    def _delta(self, comp: CompletionOutput, logprobs: bool, stream: ChatChoiceStream) -> dict[str, Any]:
        delta = stream.delta(comp.text, comp.finished)
        return {"index": comp.index, "delta": delta,
                "logprobs": self._logprobs(comp.logprobs) if logprobs else None,
                "finish_reason": finish_reason(stream.tools.plan, comp.finish_reason, stream.tools.calls),
                "stop_reason": comp.stop_reason}

    def _logprobs(self, rows: list[list[Logprob]] | None) -> dict[str, Any]:
        def entry(lp: Logprob) -> dict[str, Any]:
            text = self.token_text(lp)
            return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(row[0]), "top_logprobs": [entry(lp) for lp in row[1:]]} for row in rows or []]}
