"""What the completions and chat handlers share: checks, sampling parameters, starting and collecting streams.

Handlers are plain async code on an :class:`EngineClient`; the web framework only parses bodies and writes
responses, so the gRPC server and the router reuse the same rules.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import msgspec

from pdserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pdserve.engine.frontend.params_wire import sampling_from_model
from pdserve.engine.structured_output.params import StructuredOutputsParams
from pdserve.engine.sampling_params import SamplingParams
from pdserve.services.api.engine_client import EngineClient, OutputStream
from pdserve.services.api.errors import ApiError, bad_request, from_exception, from_value_error
from pdserve.services.api.protocol import _SamplingFields
from pdserve.services.api.request_timing import timeline_of
from pdserve.services.api.settings import ServerSettings

DONE = "data: [DONE]\n\n"
# One event per streamed token per client: msgspec encodes a chunk in ~0.4 µs where json.dumps took ~4 µs. Its
# output is compact, keeps non-ASCII text as UTF-8 and writes a non-finite float as null (json.dumps wrote NaN,
# which is not JSON).
_ENCODER = msgspec.json.Encoder()


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {_ENCODER.encode(obj).decode()}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Prompt:
    """A prompt ready for the engine: its token ids, and its text when the client sent text."""

    token_ids: list[int]
    text: str | None


@dataclass
class Usage:
    """OpenAI's ``usage``. ``cached_tokens``: prompt tokens the engine did not compute (prefix-cache hits, and KV
    a connector loaded), reported as ``prompt_tokens_details.cached_tokens``; None where the engine client does
    not know them (then no ``prompt_tokens_details``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                               "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.cached_tokens is not None:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


class CachedTokens:
    """The cached prompt tokens of a request's prompts, from their outputs as they arrive.

    A prompt with ``n > 1`` runs as ``n`` sequences, each looked up in the prefix cache on its own (the later ones
    usually hit what the first computed); the prompt counts once in ``prompt_tokens``, so it counts its fewest
    cached tokens here.
    """

    def __init__(self, known: bool = True) -> None:
        self.known = known  # False: the engine client does not report them (``total`` is None)
        self._by_seq: dict[tuple[int, int], int] = {}  # (prompt, choice index) -> cached tokens

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self._by_seq[(prompt_index, out.outputs[0].index)] = out.num_cached_tokens

    @property
    def total(self) -> int | None:
        if not self.known:
            return None
        fewest: dict[int, int] = {}
        for (prompt, _), n in self._by_seq.items():
            fewest[prompt] = min(n, fewest.get(prompt, n))
        return sum(fewest.values())


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
        if req.stream_options is not None and req.stream_options.continuous_usage_stats \
                and not req.stream_options.include_usage:
            raise bad_request("stream_options.continuous_usage_stats needs include_usage to be true",
                              param="stream_options")
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
                      cached: CachedTokens | None = None, timelines: list[dict] | None = None,
                      prompt_logprobs: list[list | None] | None = None) -> list[list[CompletionOutput]]:
        """Final outputs of every stream (per prompt, sorted by sequence index).

        With ``handles``, each stream's KV transfer handle (a prefill-role engine's, else None) is appended to it;
        with ``cached``, the final outputs are counted into it; with ``timelines``, the timeline of each finished
        sequence that has one, in finishing order; with ``prompt_logprobs``, each stream's prompt logprobs
        (``RequestOutput.prompt_logprobs``, or None).
        """

        async def one(i: int, stream: OutputStream) -> tuple[list[CompletionOutput], dict | None, list | None]:
            outs, handle, prompt_lp = [], None, None
            async for out in stream:
                # Prompt logprobs come with the first token, which behind a router is not the last output.
                prompt_lp = prompt_lp or getattr(out, "prompt_logprobs", None)
                if out.outputs[0].finished:
                    outs.append(out.outputs[0])
                    handle = getattr(out, "kv_transfer_params", None) or handle
                    if cached is not None:
                        cached.add(i, out)
                    timeline = timeline_of(out, self.engine) if timelines is not None else None
                    if timeline is not None and timelines is not None:
                        timelines.append(timeline)
            return sorted(outs, key=lambda c: c.index), handle, prompt_lp

        gathered = asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))
        # Cancelled inside wait_for (the client left), a gather ends with an exception that nobody reads, which
        # asyncio logs with a traceback when the future is collected: read it here.
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            results = list(await self.with_timeout(gathered))
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

    def cached_tokens(self) -> CachedTokens:
        """A counter of a request's cached prompt tokens (unknown behind an engine client that does not report
        them, such as the router's)."""
        return CachedTokens(getattr(self.engine, "reports_cached_tokens", True))


def usage_chunks(req: _SamplingFields) -> tuple[bool, bool]:
    """(a final usage chunk, usage on every chunk): ``stream_options.include_usage`` and
    ``continuous_usage_stats``."""
    opts = req.stream_options
    include = bool(opts and opts.include_usage)
    return include, include and bool(opts and opts.continuous_usage_stats)


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
                 retry_after: int, error_events: Callable[[ApiError], list[str]] | None = None) -> None:
        self._streams = streams
        # How an error ends the stream; OpenAI's error chunk and [DONE] unless the endpoint speaks another dialect.
        self._error_events = error_events or (lambda err: [sse(err.body()), DONE])
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
        # asyncio.timeout_at, not wait_for: wait_for wrapped every event in a new task (Python 3.11), a cost paid
        # per streamed token; the deadline's timer is only moved here.
        deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None
        try:
            while True:
                try:
                    if deadline is None:
                        event = await events.__anext__()
                    else:
                        async with asyncio.timeout_at(deadline):
                            event = await events.__anext__()
                except StopAsyncIteration:
                    return
                yield event
        except (Exception, asyncio.TimeoutError) as exc:
            for event in self._error_events(from_exception(exc, retry_after)):
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            for s in self._streams:
                s.close()
