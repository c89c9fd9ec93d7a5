"""``POST /v1/completions``: prompts (text or token ids, one or a batch) to OpenAI completion objects."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from pdserve.engine.frontend.tokenizer import tokenize_async
from pdserve.engine.outputs import CompletionOutput, Logprob
from pdserve.services.api import request_timing
from pdserve.services.api.engine_client import OutputStream
from pdserve.services.api.errors import bad_request
from pdserve.services.api.protocol import CompletionRequest
from pdserve.services.api.structured import structured_outputs_async
from pdserve.services.api.serving_common import (DONE, GuardedEvents, Prompt, ServingBase, Usage,
                                                 merge_streams, new_id, sse, usage_chunks)


class CompletionServing(ServingBase):
    """Builds completion responses; ``create`` returns a dict, or an SSE event iterator when streaming."""

    async def prompts(self, req: CompletionRequest) -> list[Prompt]:
        p = req.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif not p:
            raise bad_request("prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        if len(items) > self.settings.max_prompts_per_request:
            raise bad_request(f"at most {self.settings.max_prompts_per_request} prompts per request, "
                              f"got {len(items)}", param="prompt")
        out = []
        for item in items:
            try:
                ids = await tokenize_async(self.engine.tokenize, item)
                out.append(Prompt(ids, item if isinstance(item, str) else None))
            except ValueError as exc:
                raise bad_request(str(exc), param="prompt") from None
        return out

    async def create(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_common(req)
        prompts = await self.prompts(req)
        structured = await structured_outputs_async(req)
        params = self.sampling_params(req, req.max_tokens, req.logprobs, structured)
        handle = self.transfer_handle(req)
        request_id, created = new_id("cmpl"), int(time.time())
        streams = self.start(prompts, params, request_id, req.stream, handle)
        if req.stream:
            events = self._events(req, prompts, streams, request_id, created)
            return GuardedEvents(events, streams, self.settings.request_timeout_s, self.settings.retry_after_s)
        handles: list[dict | None] = []
        cached = self.cached_tokens()
        timelines: list[dict] = []
        results = await self.collect(streams, handles, cached, timelines if request_timing.wanted() else None)
        choices = []
        usage = Usage(prompt_tokens=sum(len(p.token_ids) for p in prompts), cached_tokens=cached.total)
        for i, (prompt, outs) in enumerate(zip(prompts, results)):
            self.check_transfer_outcome(outs, handle is not None)
            for comp in outs:
                usage.completion_tokens += len(comp.token_ids)
                text = (self._echo_text(prompt) if req.echo else "") + comp.text
                choices.append(self._choice(i * req.n + comp.index, text, comp, req.logprobs))
        body = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name(),
                "choices": choices, "usage": usage.as_dict()}
        if len(handles) == 1 and handles[0] is not None:
            body["kv_transfer_params"] = handles[0]  # a prefill pod's: where a decode pod loads this KV from
        request_timing.publish(body, timelines[0] if timelines else None)
        return body

    async def _events(self, req: CompletionRequest, prompts: list[Prompt], streams: list[OutputStream],
                      request_id: str, created: int) -> AsyncIterator[str]:
        include_usage, continuous = usage_chunks(req)
        cached = self.cached_tokens()
        usage = Usage(prompt_tokens=sum(len(p.token_ids) for p in prompts), cached_tokens=cached.total)
        echoed: set[int] = set()
        timeline = None
        async for i, out in merge_streams(streams):
            comp = out.outputs[0]
            if comp.finished and timeline is None and request_timing.wanted():
                timeline = request_timing.timeline_of(out, self.engine)
            index = i * req.n + comp.index
            usage.completion_tokens += len(comp.token_ids)
            cached.add(i, out)
            usage.cached_tokens = cached.total
            text = comp.text
            if req.echo and index not in echoed:
                echoed.add(index)
                text = self._echo_text(prompts[i]) + text
            if not text and not comp.finished and not comp.logprobs:
                continue  # nothing visible yet (a partial character or a possible stop string)
            chunk = {"id": request_id, "object": "text_completion", "created": created,
                     "model": self.model_name(), "choices": [self._choice(index, text, comp, req.logprobs)]}
            yield sse({**chunk, "usage": usage.as_dict()} if continuous else chunk)
        if include_usage:
            yield sse({"id": request_id, "object": "text_completion", "created": created,
                       "model": self.model_name(), "choices": [], "usage": usage.as_dict()})
        if timeline is not None:
            yield sse({"id": request_id, "object": "text_completion", "created": created,
                       "model": self.model_name(), "choices": [], "pdserve_timing": timeline})
        yield DONE

    def _echo_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tok = self.engine.tokenizer
        return tok.decode(prompt.token_ids) if tok is not None else ""

    def _choice(self, index: int, text: str, comp: CompletionOutput, logprobs: int | None) -> dict[str, Any]:
        return {"index": index, "text": text,
                "logprobs": self._logprobs(comp.logprobs) if logprobs is not None else None,
                "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}

    def _logprobs(self, rows: list[list[Logprob]] | None) -> dict[str, Any]:
        """OpenAI's legacy completion logprobs: parallel lists, top alternatives as {token: logprob}."""
        tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
        for row in rows or []:
            text = self.token_text(row[0])
            tokens.append(text)
            token_logprobs.append(row[0].logprob)
            top.append({self.token_text(lp): lp.logprob for lp in row[1:]} or None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
