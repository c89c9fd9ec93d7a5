"""One sequence through the router: route, (prefill), decode; retry before the first token, resume after it.

::

    attempt ─▶ route ─▶ [prefill pod: first token + KV handle] ─▶ decode pod: stream tokens ─▶ done
       ▲                         │ PodError                              │ PodError
       └──── exclude the pod ◀───┴───────────────────────────────────────┘
             before any token: a retry; after some: a resume from prompt + tokens already sent

A resumed attempt is a new request whose prompt is the original prompt plus every token the client already
got, with ``max_tokens`` and ``min_tokens`` reduced by that many, so the client sees one unbroken stream. (Under
sampling, the continuation is a fresh sample; presence/frequency penalties and bad_words still count the tokens
sent before the resume, which the new prompt ends with.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine.frontend import SamplingParams, after_tokens
from pdserve.engine.frontend.timing import Timeline
from pdserve.services.api.tracing import client_span
from pdserve.services.router.backend import BackendRequest, PodBackend, PodError, TokenDelta
from pdserve.services.router.pipeline import NoPodAvailable
from pdserve.services.router.router import Router
from pdserve.services.router.types import PodState, RoutingContext, RoutingDecision

logger = logging.getLogger(__name__)


class SequenceFailed(Exception):
    """A sequence could not be served (no pod left, or too many failed attempts)."""


class _AttemptFailed(Exception):
    def __init__(self, pod: PodState, stage: str, error: PodError) -> None:
        super().__init__(str(error))
        self.pod, self.stage, self.error = pod, stage, error


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # attempts per sequence, first one included
    backoff_s: float = 0.05  # pause before a retry (doubles each time), so a dying pod's peers can notice
    no_pod_wait_s: float = 5.0  # how long to wait for a pod to come back before failing with "no pod"


@dataclass
class SequenceSpec:
    """What the router must produce for one sequence (one of a request's ``n``)."""

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1, concrete max_tokens
    session_key: str | None = None
    # Where the sequence's time goes (engine/frontend/timing.py); the runner adds the routing and pod phases.
    timeline: Timeline = field(default_factory=lambda: Timeline(time.time()))


Emit = Callable[[TokenDelta], None]


class SequenceRunner:
    """Runs sequences to completion over pods, retrying and resuming as the module docstring describes."""

    def __init__(self, router: Router, backend: PodBackend, policy: RetryPolicy = RetryPolicy()) -> None:
        self.router = router
        self.backend = backend
        self.policy = policy
        self._releases: set[asyncio.Task] = set()  # fire-and-forget releases of abandoned KV transfers

    async def run(self, spec: SequenceSpec, emit: Emit) -> None:
        """Emit the sequence's tokens until a delta carries a finish reason; raise :class:`SequenceFailed`."""
        generated: list[int] = []  # every token the client has been sent, across attempts
        excluded: set[str] = set()
        last_error = "no attempt made"
        metrics = self.router.metrics

        def emit_and_track(delta: TokenDelta) -> None:
            generated.extend(delta.token_ids)
            emit(delta)

        for attempt in range(self.policy.max_attempts):
            if attempt:
                await asyncio.sleep(self.policy.backoff_s * (2 ** (attempt - 1)))
            remaining = spec.params.max_tokens - len(generated)
            if remaining <= 0:  # the pod died right after the last token, before saying "length"
                emit(TokenDelta([], finish_reason="length"))
                return
            prompt = spec.prompt_token_ids + generated
            ctx = self.router.context(spec.seq_id, prompt, spec.session_key, excluded, spec.params.cache_salt)
            decision = await self._route(ctx)
            spec.timeline.add("routing", time.time(), "router", "router")
            params = after_tokens(spec.params, len(generated))
            if generated and params.prompt_logprobs is not None:
                params = dataclasses.replace(params, prompt_logprobs=None)  # the client has them already
            try:
                await self._attempt(decision, BackendRequest(f"{spec.seq_id}-a{attempt}", prompt, params),
                                    emit_and_track, ctx, spec.timeline)
                return
            except _AttemptFailed as failure:
                spec.timeline.add("failed_attempt", time.time(), "router", failure.pod.name)
                last_error = str(failure.error)
                logger.warning("sequence %r attempt %d failed on pod %s: %r", spec.seq_id, attempt + 1,
                               failure.pod.name, failure.error)
                excluded.add(failure.pod.name)
                if metrics is not None:
                    if generated:
                        metrics.resumes.inc()
                    else:
                        metrics.retries.labels(failure.stage).inc()
        if metrics is not None:
            metrics.failures.labels("attempts").inc()
        raise SequenceFailed(f"gave up after {self.policy.max_attempts} attempts; last error: {last_error}")

    async def _attempt(self, decision: RoutingDecision, req: BackendRequest, emit: Emit,
                       ctx: RoutingContext, timeline: Timeline) -> None:
        """Serve one attempt on the decided pods; raise :class:`_AttemptFailed` naming the pod that failed."""
        self.router.started(ctx, decision)
        open_pods = [p for p in (decision.prefill, decision.decode) if p is not None]
        current, stage, failed = decision.decode, "decode", None
        handle = None  # a prefill's transfer that no decode pod has taken over yet
        try:
            if decision.prefill is not None:
                current, stage = decision.prefill, "prefill"
                with client_span("pdserve.v1.Prefill/Prefill", current.name):
                    first, handle = await self.backend.prefill(current.endpoint, req)
                _add_pod_phases(timeline, "prefill", current.name, first)
                self.router.finished(current)
                open_pods.remove(current)
                emit(first)
                if first.finish_reason is not None:
                    handle = None  # ended at the first token: the prefill pod released it itself
                    return
                # The decode pod continues after the prefill's token(s), loading the prompt's KV by the handle.
                # The prefill pod computed the prompt logprobs; the decode pod loads the KV, computing nothing.
                req = dataclasses.replace(
                    req, prompt_token_ids=req.prompt_token_ids + first.token_ids, kv_transfer_params=handle,
                    params=dataclasses.replace(after_tokens(req.params, len(first.token_ids)), prompt_logprobs=None))
                current, stage = decision.decode, "decode"
            # aclosing: leaving the loop early (finish, stop string, cancel) cancels the pod's stream at once.
            call = "pdserve.v1.Decode/Decode" if req.kv_transfer_params is not None \
                else "pdserve.v1.Generation/Generate"
            with client_span(call, current.name):
                async with contextlib.aclosing(self.backend.generate(current.endpoint, req)) as deltas:
                    timed = False
                    async for delta in deltas:
                        if not timed and delta.token_ids:
                            timed = True
                            _add_pod_phases(timeline, "decode", current.name, delta)
                        handle = None  # the decode pod loaded the KV (its first token needs it) and released it
                        emit(delta)
                        if delta.finish_reason is not None:
                            return
            raise PodError(current.name, "the stream ended without a finish reason")
        except PodError as exc:
            if exc.pod_healthy:
                # Not this pod's fault (e.g. KV from a dead prefill pod): retry, but keep it in rotation.
                raise _AttemptFailed(decision.prefill or current, "kv-load", exc) from None
            failed = current
            self.router.failed(current, str(exc))
            raise _AttemptFailed(current, stage, exc) from None
        finally:
            if handle is not None:
                # Abandoned before a decode pod answered (client gone, decode pod failed): free the prefill pod's
                # blocks now rather than at its lease's end. A task: this may run under cancellation.
                task = asyncio.get_running_loop().create_task(self.backend.release_transfer(handle))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
            for pod in open_pods:
                self.router.finished(pod, ok=pod is not failed)

    async def _route(self, ctx: RoutingContext) -> RoutingDecision:
        """Route, waiting a little for a pod to come back when none is ready (a restart takes seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.no_pod_wait_s
        while True:
            try:
                return self.router.route(ctx)
            except NoPodAvailable as exc:
                if loop.time() >= deadline:
                    if self.router.metrics is not None:
                        self.router.metrics.failures.labels("no-pod").inc()
                    raise SequenceFailed(str(exc)) from None
                await asyncio.sleep(0.1)


def _add_pod_phases(timeline: Timeline, prefix: str, pod: str, delta: TokenDelta) -> None:
    """A pod's first token reached the router: the hop there, the pod's own phases and the hop back (one phase
    named ``prefix`` when the pod sent no marks)."""
    now = time.time()
    marks = delta.pod_timing
    if marks is None or not marks.complete:
        timeline.add(prefix, now, prefix, pod)
        return
    timeline.add_pod(prefix, marks, pod, f"router_to_{prefix}")
    timeline.add(f"{prefix}_to_router", now, marks.role or prefix, pod)
