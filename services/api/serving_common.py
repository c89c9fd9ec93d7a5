"""What the completions and chat handlers share: checks, sampling parameters, starting and collecting streams.

Handlers are plain async code on an :class:`EngineClient`; the web framework only parses bodies and writes
responses, so the gRPC server and the router reuse the same rules.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from pdserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pdserve.engine.frontend.params_wire import sampling_from_model
from pdserve.engine.structured_output.params import StructuredOutputsParams
from pdserve.engine.sampling_params import SamplingParams
from pdserve.services.api.engine_client import EngineClient, OutputStream
from pdserve.services.api.errors import ApiError, bad_request, from_exception, from_value_error
from pdserve.services.api.protocol import _SamplingFields
from pdserve.services.api.settings import ServerSettings

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Prompt:
    """A prompt ready for the engine: its token ids, and its text when the client sent text."""

    token_ids: list[int]
    text: str | None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ServingBase:
    """Request checks and engine plumbing common to the OpenAI endpoints."""

    def __init__(self, engine: EngineClient, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.settings.served_model_names:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{', '.join(self.settings.served_model_names)}", param="model", code="model_not_found")

    def check_common(self, req: _SamplingFields) -> None:
        self.check_model(req.model)
        unsupported = req.unsupported()
        if unsupported is not None:
            raise bad_request(unsupported[1], param=unsupported[0], code="unsupported")
        s = self.settings
        if req.n > s.max_n or req.n < 1:
            raise bad_request(f"n must be an integer in [1, {s.max_n}], got {req.n}", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > s.max_stop:
            raise bad_request(f"at most {s.max_stop} stop strings are allowed, got {len(stops)}", param="stop")

    def sampling_params(self, req: _SamplingFields, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """SamplingParams from a request; OpenAI defaults where the client left a field out. ``structured``: the
        request's output constraint, already checked (:mod:`.structured`)."""
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and limit is not None and max_tokens > limit:
            raise bad_request(f"max_tokens must be at most {limit}, got {max_tokens}", param="max_tokens")
        if logprobs is not None and not 0 <= logprobs <= self.settings.max_logprobs:
            raise bad_request(f"logprobs must be in [0, {self.settings.max_logprobs}], got {logprobs}",
                              param="logprobs")

        try:
            return sampling_from_model(req, max_tokens=max_tokens, logprobs=logprobs, structured_outputs=structured)
        except ValueError as exc:
            raise from_value_error(exc) from None

    # ------------------------------------------------------------------ engine
    def transfer_handle(self, req: _SamplingFields) -> dict | None:
        """The request's ``kv_transfer_params``, checked (a 400 naming the field when malformed), or None."""
        if req.kv_transfer_params is None:
            return None
        from pdserve.engine.kv_transfer.base import KVTransferParams

        try:
            return KVTransferParams.from_dict(req.kv_transfer_params).to_dict()
        except ValueError as exc:
            raise bad_request(str(exc), param="kv_transfer_params") from None

    def start(self, prompts: list[Prompt], params: SamplingParams, request_id: str,
              stream: bool, kv_transfer_params: dict | None = None) -> list[OutputStream]:
        """Queue every prompt; if one is refused, abort the ones already queued and raise the mapped error.

        ``kv_transfer_params`` (one prompt only): load that prefill's KV instead of computing it (decode role).
        """
        if kv_transfer_params is not None and len(prompts) != 1:
            raise bad_request("a KV transfer handle belongs to one prompt", param="kv_transfer_params")
        extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None else {}
        streams: list[OutputStream] = []
        try:
            for i, p in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(self.engine.generate(p.token_ids, params, rid, stream=stream, prompt_text=p.text,
                                                    **extra))
        except Exception as exc:
            for s in streams:
                s.close()
            err = from_exception(exc, self.settings.retry_after_s)
            if len(prompts) > 1 and err.status == 400 and err.param == "prompt":
                err.message = f"prompt {len(streams)}: {err.message}"
            raise err from None
        return streams

    async def collect(self, streams: list[OutputStream], handles: list[dict | None] | None = None,
                      prompt_logprobs: list[list | None] | None = None) -> list[list[CompletionOutput]]:
        """Final outputs of every stream (per prompt, sorted by sequence index).

        With ``handles``, each stream's KV transfer handle (a prefill-role engine's, else None) is appended to it;
        with ``prompt_logprobs``, each stream's prompt logprobs (``RequestOutput.prompt_logprobs``, or None).
        """

        async def one(stream: OutputStream) -> tuple[list[CompletionOutput], dict | None, list | None]:
            outs, handle, prompt_lp = [], None, None
            async for out in stream:
                if out.outputs[0].finished:
                    outs.append(out.outputs[0])
                    handle = getattr(out, "kv_transfer_params", None) or handle
                    prompt_lp = prompt_lp or getattr(out, "prompt_logprobs", None)
            return sorted(outs, key=lambda c: c.index), handle, prompt_lp

        try:
            results = list(await self.with_timeout(asyncio.gather(*(one(s) for s in streams))))
        finally:
            for s in streams:
                s.close()
        if handles is not None:
            handles.extend(h for _, h, _ in results)
        if prompt_logprobs is not None:
            prompt_logprobs.extend(p for _, _, p in results)
        return [outs for outs, _, _ in results]

    @staticmethod
    def check_transfer_outcome(outs: list[CompletionOutput], had_handle: bool) -> None:
        """A request that carried a handle and was ended by the engine (a KV load that failed under the ``fail``
        policy; the reason rides in ``stop_reason``) is an error, not an empty answer."""
        for comp in outs:
            if had_handle and comp.finish_reason == "abort" and comp.stop_reason:
                raise ApiError(409, str(comp.stop_reason), param="kv_transfer_params", code="kv_transfer_failed")

    async def with_timeout(self, aw: Any) -> Any:
        timeout = self.settings.request_timeout_s
        return await (asyncio.wait_for(aw, timeout) if timeout else aw)

    # ------------------------------------------------------------------ text helpers
    def token_text(self, lp: Logprob) -> str:
        """How a token reads on its own (cached per id: logprobs ask for the same ids over and over)."""
        if lp.decoded is not None:
            return lp.decoded
        text = self._token_text.get(lp.token_id)
        if text is None:
            tok = self.engine.tokenizer
            text = tok.decode([lp.token_id]) if tok is not None else str(lp.token_id)
            self._token_text[lp.token_id] = text
        return text

    def model_name(self) -> str:
        return self.settings.model_name


async def merge_streams(streams: list[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as outputs arrive, tagging each with its stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: OutputStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, end))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await queue.get()
            if item is end:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


class GuardedEvents:
    """An SSE event iterator run under the request timeout; an error mid-stream becomes an error event.

    ``aclose()`` closes the engine streams even if iteration never started (the client left before the first
    byte), so no request is left running without a reader.
    """

    def __init__(self, events: AsyncIterator[str], streams: list[OutputStream], timeout_s: float,
                 retry_after: int) -> None:
        self._streams = streams
        self._gen = self._run(events, timeout_s, retry_after)

    def __aiter__(self) -> "GuardedEvents":
        return self

    def __anext__(self) -> Any:
        return self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()
        for s in self._streams:
            s.close()

    async def _run(self, events: AsyncIterator[str], timeout_s: float, retry_after: int) -> AsyncIterator[str]:
        deadline = time.monotonic() + timeout_s if timeout_s else None
        try:
            while True:
                try:
                    if deadline is None:
                        event = await events.__anext__()
                    else:
                        event = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    return
                yield event
        except (Exception, asyncio.TimeoutError) as exc:
            yield sse(from_exception(exc, retry_after).body())
            yield DONE
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            for s in self._streams:
                s.close()
