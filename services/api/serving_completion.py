"""``POST /v1/completions``: prompts (text or token ids, one or a batch) to OpenAI completion objects."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, AsyncIterator

from pdserve.engine.frontend.tokenizer import tokenize_async
from pdserve.engine.outputs import CompletionOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.services.api import request_timing
from pdserve.services.api.completion_logprobs import LegacyLogprobs, vllm_prompt_logprobs
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
        best_of = self._best_of(req)
        prompts = await self.prompts(req)
        structured = await structured_outputs_async(req)
        # max_tokens 0 (with echo: unsupported() refuses it alone) scores the prompt: the engine samples one
        # token, which is dropped.
        score_only = req.max_tokens == 0
        params = self.sampling_params(req, 1 if score_only else req.max_tokens, req.logprobs, structured)
        params = self._engine_params(req, params, best_of)
        handle = self.transfer_handle(req)
        request_id, created = new_id("cmpl"), int(time.time())
        streams = self.start(prompts, params, request_id, req.stream, handle)
        if req.stream:
            events = self._events(req, prompts, streams, request_id, created)
            return GuardedEvents(events, streams, self.settings.request_timeout_s, self.settings.retry_after_s)
        handles: list[dict | None] = []
        cached = self.cached_tokens()
        timelines: list[dict] = []
        prompt_lps: list[list | None] = []
        results = await self.collect(streams, handles, cached, timelines if request_timing.wanted() else None,
                                     prompt_lps)
        choices: list[dict[str, Any]] = []
        usage = Usage(prompt_tokens=sum(len(p.token_ids) for p in prompts), cached_tokens=cached.total)
        for i, (prompt, outs, prompt_lp) in enumerate(zip(prompts, results, prompt_lps)):
            self.check_transfer_outcome(outs, handle is not None)
            # Usage counts every candidate's tokens (as OpenAI does for best_of); none when only scoring.
            usage.completion_tokens += 0 if score_only else sum(len(c.token_ids) for c in outs)
            if best_of > req.n:
                outs = _best(outs, req.n)
            for index, comp in enumerate(outs):
                choices.append(self._choice(req, i * req.n + index, prompt, comp, prompt_lp, echo=req.echo))
        body = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name(),
                "choices": choices, "usage": usage.as_dict()}
        if len(handles) == 1 and handles[0] is not None:
            body["kv_transfer_params"] = handles[0]  # a prefill pod's: where a decode pod loads this KV from
        request_timing.publish(body, timelines[0] if timelines else None)
        return body

    def _best_of(self, req: CompletionRequest) -> int:
        """The number of candidates to generate (``best_of``, checked; n when unset)."""
        if req.best_of is None:
            return req.n
        limit = self.settings.max_n
        if not req.n <= req.best_of <= limit:
            raise bad_request(f"best_of must be an integer in [n, {limit}] (n = {req.n}), got {req.best_of}",
                              param="best_of")
        return req.best_of

    @staticmethod
    def _engine_params(req: CompletionRequest, params: SamplingParams, best_of: int) -> SamplingParams:
        """What the engine runs: prompt logprobs when the prompt is echoed with logprobs (or asked directly), and
        ``best_of`` candidates with their logprobs (ranked by their sum)."""
        changes: dict[str, Any] = {}
        if req.echo and req.logprobs is not None:
            changes["prompt_logprobs"] = max(req.logprobs, req.prompt_logprobs or 0)
        if best_of > req.n:
            changes["n"] = best_of
            if params.logprobs is None:
                changes["logprobs"] = 0
        return dataclasses.replace(params, **changes) if changes else params

    async def _events(self, req: CompletionRequest, prompts: list[Prompt], streams: list[OutputStream],
                      request_id: str, created: int) -> AsyncIterator[str]:
        include_usage, continuous = usage_chunks(req)
        cached = self.cached_tokens()
        usage = Usage(prompt_tokens=sum(len(p.token_ids) for p in prompts), cached_tokens=cached.total)
        score_only = req.max_tokens == 0
        sent_chars: dict[int, int] = {}  # per choice: characters sent so far (text_offset continues from there)
        timeline = None
        async for i, out in merge_streams(streams):
            comp = out.outputs[0]
            if comp.finished and timeline is None and request_timing.wanted():
                timeline = request_timing.timeline_of(out, self.engine)
            if score_only:
                comp = dataclasses.replace(comp, text="", token_ids=[], logprobs=[] if comp.logprobs else None)
            index = i * req.n + comp.index
            usage.completion_tokens += len(comp.token_ids)
            cached.add(i, out)
            usage.cached_tokens = cached.total
            echo = req.echo and index not in sent_chars
            choice = self._choice(req, index, prompts[i], comp, out.prompt_logprobs, echo=echo,
                                  offset=sent_chars.get(index, 0))
            sent_chars[index] = sent_chars.get(index, 0) + len(choice["text"])
            if not choice["text"] and not comp.finished and not comp.logprobs:
                continue  # nothing visible yet (a partial character or a possible stop string)
            chunk = {"id": request_id, "object": "text_completion", "created": created,
                     "model": self.model_name(), "choices": [choice]}
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

    def _choice(self, req: CompletionRequest, index: int, prompt: Prompt, comp: CompletionOutput,
                prompt_lp: list | None, echo: bool, offset: int = 0) -> dict[str, Any]:
        """One choice; with ``echo`` the prompt's text (and its logprobs) come first. ``offset``: the characters of
        this choice already streamed."""
        head = self._echo_text(prompt) if echo else ""
        generated = "" if req.max_tokens == 0 else comp.text
        choice: dict[str, Any] = {"index": index, "text": head + generated, "logprobs": None,
                                  "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}
        if req.logprobs is not None:
            lp = LegacyLogprobs(self.token_text, req.logprobs, offset)
            if echo and prompt_lp is not None:
                lp.add_prompt(prompt.token_ids, prompt_lp)
            lp.offset = offset + len(head)
            if req.max_tokens != 0:
                lp.add_rows(comp.logprobs or [])
            choice["logprobs"] = lp.as_dict()
        if req.prompt_logprobs is not None and prompt_lp is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(prompt_lp, self.token_text)
        return choice


def _best(outs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The ``n`` candidates with the highest cumulative logprob, best first."""
    ranked = sorted(outs, key=lambda c: c.cumulative_logprob if c.cumulative_logprob is not None
                    else float("-inf"), reverse=True)
    return ranked[:n]
