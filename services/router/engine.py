"""``RouterEngine``: the router as an :class:`~pdserve.services.api.engine_client.EngineClient`.

The HTTP and gRPC front ends of a monolithic server (``services/api``) run unchanged on top of it, so clients
cannot tell a router from a server. Where ``AsyncLLM`` sends sequences to its engine core, this sends each one
through a :class:`~pdserve.services.router.sequence.SequenceRunner` to the pods, and feeds the token deltas that
come back into the same :class:`~pdserve.engine.frontend.output_processor.OutputProcessor` (detokenization, stop
strings), so the text is made in one place even when a stream moves from one pod to another. Validation, fan-out
and stats are the engine front end's own (:mod:`pdserve.engine.frontend`), so a request is refused here exactly
as a pod would refuse it, before any pod sees it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
import uuid
from typing import Any, Iterable

from pdserve.engine.frontend import (EngineCoreOutput, IterationStats, OutputProcessor, OutputStream, SamplingParams,
                                     SequenceTimes, StatLogger, fan_out, record_all, tokenize_prompt,
                                     validate_prompt, with_default_max_tokens)
from pdserve.engine.frontend import timing
from pdserve.services.api.errors import ApiError
from pdserve.services.api.tracing import current_context, current_trace_id, record_timeline
from pdserve.services.router.anatomy import AnatomyMetrics, access_line, access_logger
from pdserve.services.router.backend import PodRejected, TokenDelta
from pdserve.services.router.sequence import SequenceFailed, SequenceRunner, SequenceSpec

logger = logging.getLogger(__name__)

# Session key of the request being handled (set by the HTTP middleware from a header or the ``user`` field).
SESSION_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("pdserve_router_session", default=None)
_END = object()


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the router must know about the served model to validate requests like an engine would."""

    name: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None


class RouterEngine:
    """Serves requests by routing each sequence to pods; see the module docstring."""

    # Usage's prompt_tokens_details.cached_tokens: the prefix-cache hits of the pod that computed the prompt (the
    # prefill pod, or the pod a Generate stream ran on), which its first token carries.
    reports_cached_tokens = True

    def __init__(self, model: ModelInfo, tokenizer: Any, runner: SequenceRunner,
                 stat_loggers: Iterable[StatLogger] = (), anatomy: AnatomyMetrics | None = None,
                 access_log: str = "off") -> None:
        """``anatomy``: the per-phase histograms each finished sequence's timeline goes into; ``access_log``:
        ``off``, ``text`` or ``json`` (one ``pdserve.access`` log line per finished sequence)."""
        if access_log not in ("off", "text", "json"):
            raise ValueError(f"access_log must be off, text or json, got {access_log!r}")
        self.anatomy = anatomy
        self.access_log = access_log
        self.model = model
        self.model_name = model.name
        self.max_model_len = model.max_model_len
        self.tokenizer = tokenizer
        self.runner = runner
        self.stat_loggers = list(stat_loggers)
        self._processor = OutputProcessor(tokenizer)
        self._streams: dict[str, RouterStream] = {}
        self._closed = False

    # ------------------------------------------------------------------ EngineClient
    @property
    def is_ready(self) -> bool:
        return not self._closed and self.runner.router.has_decode_pod()

    @property
    def dead_error(self) -> BaseException | None:
        return None  # pods come and go; the router itself never dies for good

    def get_stats(self) -> None:
        return None  # each engine reports its own scheduler stats

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        # The same rules and messages as EngineCore.validate, checked here so a bad request never reaches a pod.
        validate_prompt(token_ids, params, self.max_model_len, self.model.vocab_size)

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, *,
                 stream: bool = True, prompt_text: str | None = None,
                 kv_transfer_params: dict | None = None) -> "RouterStream":
        """Validate and start a request now (errors raise here); iterate the stream for its outputs.

        ``request_id`` is the client's label (returned in the outputs); sequences are keyed by the router's own
        ids. ``kv_transfer_params`` is refused: the router picks the prefill and decode pods itself, and a
        client's handle is never forwarded to a pod.
        """
        if kv_transfer_params is not None:
            raise ApiError(400, "the router does not take kv_transfer_params: it runs the prefill itself; send "
                           "the request without it", param="kv_transfer_params")
        if self._closed:
            raise ApiError(503, "the router is shutting down", code="shutting_down", retry_after=1)
        if not self.runner.router.has_decode_pod():
            raise ApiError(503, "no decode pod is ready", code="no_pod_available", retry_after=1)
        internal_id = uuid.uuid4().hex
        token_ids = self.tokenize(prompt)
        self._validate(token_ids, params)
        params = with_default_max_tokens(params, len(token_ids), self.max_model_len)
        text = prompt_text if prompt_text is not None else (prompt if isinstance(prompt, str) else None)
        result = RouterStream(self, internal_id, stream, params.n, label=request_id or internal_id)
        self._streams[internal_id] = result
        now = time.time()
        session = SESSION_KEY.get()
        current = timing.CURRENT.get()
        received = current.received if current is not None else now  # the front end's arrival mark
        for index, (seq_id, seq_params) in enumerate(fan_out(internal_id, params)):
            self._processor.add_sequence(seq_id, result.label, index, text, token_ids, seq_params, stream=stream)
            times = SequenceTimes(arrival=now, num_prompt_tokens=len(token_ids))
            spec = SequenceSpec(seq_id, token_ids, seq_params, session, timing.Timeline(received))
            result.tasks[seq_id] = asyncio.get_running_loop().create_task(
                self._run(result, spec, times), name=f"router-seq-{seq_id}")
        return result

    async def reset_prefix_cache(self) -> dict[str, str]:
        """Reset the prefix cache of every known pod (per pod: ``"ok"`` or why not); the router's prefix index
        forgets the pods that were reset."""
        from pdserve.services.router.admin import reset_prefix_caches

        pods = self.runner.router.pods.all()
        results = await reset_prefix_caches([p.endpoint for p in pods],
                                            getattr(self.runner.backend, "cluster_secret", None))
        for name, outcome in results.items():
            if outcome == "ok":
                self.runner.router.deps.prefix.remove_pod(name)
        return results

    async def abort(self, request_id: str) -> None:
        """Cancel the live requests with this id or label."""
        for stream in [s for s in self._streams.values() if request_id in (s.internal_id, s.label)]:
            stream.close()

    async def shutdown(self) -> None:
        self._closed = True
        for stream in list(self._streams.values()):
            stream.close()

    # ------------------------------------------------------------------ sequences
    async def _run(self, result: "RouterStream", spec: SequenceSpec, times: SequenceTimes) -> None:
        finished = False
        # Prompt logprobs come with the first token (from whichever pod computed the prompt); a one-token prompt
        # has none on the wire, but still an (empty) answer.
        want_prompt_logprobs = spec.params.prompt_logprobs is not None
        cached = 0  # prompt tokens found in a prefix cache, from the first delta that says (a resume's is ignored)
        cached_known = False

        timeline = spec.timeline
        trace_parent = current_context()  # the request's span: the phases' spans go under it

        def emit(delta: TokenDelta) -> None:
            nonlocal finished, want_prompt_logprobs, cached, cached_known
            if not cached_known and delta.token_ids:
                cached_known = True
                cached = min(delta.num_cached_tokens or 0, len(spec.prompt_token_ids))
            it = IterationStats(timestamp=time.time())
            if delta.token_ids and timeline.first_token_at is None:
                timeline.add("router_respond", it.timestamp, "router", "router")
                timeline.mark_first_token()
            times.on_tokens(it.timestamp, len(delta.token_ids), it)
            prompt_lp = None
            if want_prompt_logprobs and delta.token_ids:
                prompt_lp, want_prompt_logprobs = delta.prompt_logprobs or [], False
            out = EngineCoreOutput(spec.seq_id, list(delta.token_ids), delta.logprobs, delta.finish_reason,
                                   delta.stop_reason, num_cached_tokens=cached, prompt_logprobs=prompt_lp)
            processed = self._processor.process([out])
            for ro in processed.request_outputs:
                comp = ro.outputs[0]
                if comp.finished:
                    finished = True
                    it.finished.append(times.finish(comp.finish_reason or "stop", it.timestamp))
                    ro.timeline = self._close_timeline(timeline, ro, times, trace_parent)
                if result.stream or comp.finished:
                    result.queue.put_nowait(ro)
            self._log(it)
            if processed.stop_string_finished:
                raise _StopString()  # ends the pod stream: the router found a stop string first

        try:
            await self.runner.run(spec, emit)
        except _StopString:
            pass
        except asyncio.CancelledError:
            self._processor.remove(spec.seq_id)
            if not finished:
                self._log_finish(times, "abort")
            raise
        except (SequenceFailed, PodRejected) as exc:
            self._processor.remove(spec.seq_id)
            self._log_finish(times, "error")
            result.queue.put_nowait(_as_api_error(exc))
        except Exception as exc:  # a router bug must fail the request, not hang it
            logger.exception("sequence %r failed", spec.seq_id)
            self._processor.remove(spec.seq_id)
            self._log_finish(times, "error")
            result.queue.put_nowait(ApiError(500, f"internal router error: {type(exc).__name__}",
                                             code="internal_error"))
        finally:
            result.tasks.pop(spec.seq_id, None)

    def _close_timeline(self, timeline: timing.Timeline, ro: Any, times: SequenceTimes,
                        trace_parent: Any) -> dict[str, Any]:
        """End a finished sequence's timeline at its last token; count it and log it. Returns the timeline as
        the response's ``pdserve_timing`` object."""
        last = times.last_token if times.last_token is not None else time.time()
        if timeline.first_token_at is not None and last > timeline.end:
            pod = next((p.pod for p in reversed(timeline.phases) if p.role != "router"), "router")
            timeline.add("decode_stream", last, "decode", pod)
        comp = ro.outputs[0]
        record_timeline(timeline, trace_parent)
        trace_id = current_trace_id(trace_parent)
        if self.anatomy is not None:
            self.anatomy.observe(timeline, {"trace_id": trace_id} if trace_id else None)
        if self.access_log != "off":
            access_logger.info(access_line(
                timeline, request_id=ro.request_id, index=comp.index, finish_reason=comp.finish_reason or "stop",
                num_prompt_tokens=times.num_prompt_tokens, num_generation_tokens=times.num_generation_tokens,
                trace_id=trace_id, as_json=self.access_log == "json"))
        return timeline.as_dict()

    def _log_finish(self, times: SequenceTimes, reason: str) -> None:
        it = IterationStats(timestamp=time.time())
        it.finished.append(times.finish(reason, it.timestamp))
        self._log(it)

    def _log(self, it: IterationStats) -> None:
        record_all(self.stat_loggers, None, it)


class _StopString(Exception):
    pass


def _as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, PodRejected):
        return ApiError(exc.status, str(exc), code="rejected_by_pod")
    return ApiError(503, f"the request could not be served: {exc}", code="no_pod_available", retry_after=1)


class RouterStream(OutputStream):
    """One request's outputs; closing it cancels its sequences, which cancels their pod streams (so the pods
    abort them)."""

    def __init__(self, engine: RouterEngine, internal_id: str, stream: bool, num_sequences: int,
                 label: str = "") -> None:
        super().__init__(asyncio.Queue(), num_sequences, internal_id, label)
        self.engine = engine
        self.label = self.request_id
        self.stream = stream
        self.tasks: dict[str, asyncio.Task] = {}

    def _stop(self) -> None:
        self.engine._streams.pop(self.internal_id, None)
        for task in list(self.tasks.values()):
            task.cancel()

    def __del__(self) -> None:
        # A stream dropped unread must not leave its sequences running on the pods.
        if not self._closed:
            try:
                self.close()
            except Exception:
                pass
