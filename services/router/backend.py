"""How the router talks to engine pods: token ids in, token ids out, over each pod's gRPC ``Generation`` service.

The router tokenizes, detokenizes and applies stop strings itself (as the async engine's front end does), so
pods only ever see token ids and return token ids: a stream can move to another pod mid-way without the text
changing. Failures are sorted into two kinds, because the router treats them differently:

* :class:`PodError` -- the pod could not serve (unreachable, dying, overloaded, stream cut): retry elsewhere,
  or resume the stream on another pod;
* :class:`PodRejected` -- the pod refused the request itself (a bad parameter): retrying cannot help, the client
  gets the error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.engine.frontend import Logprob, SamplingParams
from pdserve.engine.frontend.params_wire import sampling_to_pb
from pdserve.engine.frontend.timing import PodMarks
from pdserve.engine.security import ClusterSecret
from pdserve.proto.pdserve.v1 import disagg_pb2, disagg_pb2_grpc
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.api.auth import ENGINE_SCOPE
from pdserve.services.api.tracing import outgoing_metadata
from pdserve.services.router.delta_mux import DeltaSubscription, SubscriptionLost, call_responses
from pdserve.services.router.types import Endpoint

# After a pod's Deltas stream closed, its calls stream on their own for this long before the router subscribes again.
RESUBSCRIBE_AFTER_S = 1.0
# The longest a channel waits before reconnecting to a pod that went away (so a restarted pod rejoins within about
# one health interval plus this).
RECONNECT_BACKOFF_MS = 1000

# gRPC codes that mean "this pod, now" rather than "this request": the router may try another pod.
# INTERNAL and UNKNOWN are not among them: a pod answers INTERNAL when its engine failed on this request (and
# aborted it, serving on), UNKNOWN when its handler raised on this request; the same request would fail the
# same way on every other pod, so retrying would only spread it (issue 11). A pod that cannot serve at all
# answers UNAVAILABLE.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNIMPLEMENTED}
# HTTP status the client sees for a refusal, by gRPC code (the inverse of the API's table).
_HTTP_OF = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
            grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.FAILED_PRECONDITION: 400,
            grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNKNOWN: 500}


class PodError(Exception):
    """The pod failed to serve; another pod may succeed. ``pod_healthy``: the pod itself is fine (e.g. a decode
    pod that could not load KV from a dead prefill pod), so it stays in rotation."""

    def __init__(self, pod: str, message: str, pod_healthy: bool = False) -> None:
        super().__init__(f"pod {pod}: {message}")
        self.pod = pod
        self.pod_healthy = pod_healthy


class PodRejected(Exception):
    """The pod refused the request as invalid; ``status`` is the HTTP status the client should get."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class TokenDelta:
    """New tokens of one sequence from a pod (one stream message)."""

    token_ids: list[int]
    logprobs: list[list[Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # The pod's marks of the sequence's way to its first token (on the delta with a pod's first token).
    pod_timing: PodMarks | None = None
    # With the first token, when the request asked for prompt_logprobs: a row per prompt token after the first.
    prompt_logprobs: list[list[Logprob]] | None = None
    # With the first token of a Generate stream or a Prefill answer: prompt tokens the pod found in its prefix
    # cache (None: the pod did not say).
    num_cached_tokens: int | None = None


@dataclass(frozen=True)
class BackendRequest:
    """One sequence as sent to a pod. ``params`` has ``n == 1`` and a concrete ``max_tokens``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: Any = None  # the prefill pod's transfer handle (opaque to the router), for Decode


class PodBackend(Protocol):
    """What the router needs from pods; tests swap in an in-process fake."""

    def generate(self, pod: Endpoint, req: BackendRequest) -> AsyncIterator[TokenDelta]:
        """Stream a sequence's tokens; raise :class:`PodError` / :class:`PodRejected`."""

    async def prefill(self, pod: Endpoint, req: BackendRequest) -> tuple[TokenDelta, Any]:
        """Compute the prompt on a prefill pod: its first token, and the KV transfer handle for the decode pod
        (None when the request already ended at that token)."""

    async def release_transfer(self, handle: Any) -> None:
        """Free a prefill's KV transfer (the handle :meth:`prefill` returned) that no decode pod will load.
        Best effort: the prefill pod's lease frees it anyway."""

    async def check_health(self, pod: Endpoint, timeout_s: float) -> bool:
        """True when the pod answers its health check as serving."""

    async def close(self) -> None: ...


def _logprobs_of(entries: Any) -> list[list[Logprob]] | None:
    """``TokenLogprob`` messages (a choice's ``logprobs`` or ``prompt_logprobs``) as rows, None when empty."""
    if not entries:
        return None
    rows = []
    for lp in entries:
        row = [Logprob(int(lp.token_id), float(lp.logprob), int(lp.rank), lp.token or None)]
        row.extend(Logprob(int(t.token_id), float(t.logprob), i + 1, t.token or None)
                   for i, t in enumerate(lp.top_logprobs))
        rows.append(row)
    return rows


def _delta(choice: Any) -> TokenDelta:
    return TokenDelta(list(choice.token_ids), _logprobs_of(choice.logprobs), choice.finish_reason or None,
                      _stop_reason(choice.stop_reason), prompt_logprobs=_logprobs_of(choice.prompt_logprobs),
                      num_cached_tokens=(choice.num_cached_tokens if choice.HasField("num_cached_tokens")
                                         else None))


def _stop_reason(text: str) -> int | str | None:
    if not text:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


class GrpcPodBackend:
    """Talks to pods over their gRPC ``pdserve.v1.Generation`` service, one channel per pod target.

    With a ``cluster_secret`` every call carries a fresh call token (``x-pdserve-auth``), which pods that hold the
    same secret require (see ``services/api/auth.py``)."""

    def __init__(self, connect_timeout_s: float = 5.0, max_message_bytes: int = 64 << 20,
                 cluster_secret: ClusterSecret | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.cluster_secret = cluster_secret  # also signs KV Release calls and verifies handles before dialling
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes),
                         # Notice a dead peer mid-stream within seconds, not at the OS's TCP timeout.
                         ("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 5000),
                         ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                         # Reconnect to a pod that was down at least every RECONNECT_BACKOFF_MS. grpc's default
                         # backoff grows to 120 s; after a pod restart the channel then sat in its backoff and
                         # failed every health check for 7-26 s after the pod was serving again.
                         ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                         ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                         ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS)]
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Per pod target: its Deltas subscription (services/router/delta_mux.py), and the pods without the method.
        self._subscriptions: dict[str, DeltaSubscription] = {}
        self._no_deltas: set[str] = set()

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call token of one call (none without a secret) and the current trace context (W3C
        ``traceparent``, when in a trace); None when there is neither."""
        items = list(self.cluster_secret.call_headers(ENGINE_SCOPE).items()) if self.cluster_secret else []
        items += outgoing_metadata()
        return tuple(items) or None

    def _channel(self, pod: Endpoint) -> grpc.aio.Channel:
        if not pod.grpc_target:
            raise PodError(pod.name, "has no gRPC address")
        ch = self._channels.get(pod.grpc_target)
        if ch is None:
            ch = self._channels[pod.grpc_target] = grpc.aio.insecure_channel(pod.grpc_target, options=self._options)
        return ch

    @property
    def subscriptions(self) -> dict[str, DeltaSubscription]:
        """The Deltas subscriptions by pod gRPC target (a copy; closed ones stay until the pod's next call)."""
        return dict(self._subscriptions)

    def _subscription(self, pod: Endpoint, channel: grpc.aio.Channel) -> DeltaSubscription | None:
        """The pod's Deltas subscription when it is open; opens one (for later calls) when there is none."""
        target = pod.grpc_target or ""
        sub = self._subscriptions.get(target)
        if sub is not None and sub.closed:
            if sub.unimplemented:
                self._no_deltas.add(target)
            if time.monotonic() - sub.closed_at < RESUBSCRIBE_AFTER_S:
                return None  # not a new stream per call while a pod refuses them (overloaded, a wrong secret)
            sub = None
        if sub is None:
            if target in self._no_deltas:
                return None
            # Only the call token: the stream outlives the request whose call opened it, so no trace context.
            auth = tuple(self.cluster_secret.call_headers(ENGINE_SCOPE).items()) if self.cluster_secret else None
            self._subscriptions[target] = DeltaSubscription(channel, auth)
            return None
        return sub if sub.ready else None

    async def forget(self, pod: Endpoint) -> None:
        """Close the channel of a pod that left (a later pod at the same address gets a fresh one)."""
        sub = self._subscriptions.pop(pod.grpc_target or "", None)
        if sub is not None:
            await sub.close()
        self._no_deltas.discard(pod.grpc_target or "")
        ch = self._channels.pop(pod.grpc_target or "", None)
        if ch is not None:
            await ch.close()

    def _error(self, pod: Endpoint, exc: grpc.aio.AioRpcError, decoding_kv: bool = False) -> Exception:
        code = exc.code()
        if decoding_kv and code == grpc.StatusCode.FAILED_PRECONDITION:
            # The decode pod could not load the prefill's KV (its "fail" policy): retry the whole attempt; the
            # decode pod is not to blame.
            return PodError(pod.name, f"KV load failed: {exc.details()}", pod_healthy=True)
        if code in _RETRYABLE or code not in _HTTP_OF:
            return PodError(pod.name, f"{code.name}: {exc.details()}")
        return PodRejected(_HTTP_OF[code], exc.details() or code.name)

    @staticmethod
    def _request(req: BackendRequest) -> pb.GenerateRequest:
        return pb.GenerateRequest(request_id=req.request_id, token_ids=pb.TokenIds(ids=req.prompt_token_ids),
                                  sampling_params=sampling_to_pb(req.params))

    async def generate(self, pod: Endpoint, req: BackendRequest) -> AsyncIterator[TokenDelta]:
        """``Decode`` with the handle after a remote prefill, else the plain ``Generate`` stream."""
        channel = self._channel(pod)
        decoding_kv = req.kv_transfer_params is not None
        request = self._request(req)
        sub = self._subscription(pod, channel)
        queue = None
        if sub is not None:  # the pod sends this call's tokens over its Deltas stream, batched with the others'
            delivery, queue = sub.register()
            request.delivery.CopyFrom(delivery)
        if decoding_kv:
            call = disagg_pb2_grpc.DecodeStub(channel).Decode(
                disagg_pb2.DecodeRequest(request=request, kv_transfer_params=req.kv_transfer_params),
                metadata=self._metadata())
        else:
            call = pb_grpc.GenerationStub(channel).Generate(request, metadata=self._metadata())
        responses = call if queue is None else call_responses(call, queue)
        try:
            async for resp in responses:
                for choice in resp.choices:
                    delta = _delta(choice)
                    if resp.HasField("timing"):
                        delta.pod_timing = PodMarks.from_pb(resp.timing)
                    yield delta
        except grpc.aio.AioRpcError as exc:
            raise self._error(pod, exc, decoding_kv) from None
        except SubscriptionLost as exc:
            raise PodError(pod.name, f"its Deltas stream closed mid-sequence: {exc}") from None
        finally:
            call.cancel()  # a no-op when finished; aborts the pod's request when the router gives up early
            if queue is not None:  # only a registered call has one
                assert sub is not None
                sub.unregister(request.delivery.key)
                await responses.aclose()  # type: ignore[union-attr]

    async def prefill(self, pod: Endpoint, req: BackendRequest) -> tuple[TokenDelta, Any]:
        stub = disagg_pb2_grpc.PrefillStub(self._channel(pod))
        try:
            resp = await stub.Prefill(disagg_pb2.PrefillRequest(request=self._request(req)), metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise self._error(pod, exc) from None
        handle = resp.kv_transfer_params if resp.HasField("kv_transfer_params") else None
        delta = _delta(resp.choice)
        delta.num_cached_tokens = resp.num_cached_tokens
        if resp.HasField("timing"):
            delta.pod_timing = PodMarks.from_pb(resp.timing)
        return delta, handle

    async def release_transfer(self, handle: Any) -> None:
        if handle is None or self.cluster_secret is None or not handle.kv_server:
            return  # store connectors keep no blocks for a handle; without the secret no KV server listens
        from pdserve.engine.kv_transfer.base import KVHandleError, KVTransferParams
        from pdserve.engine.kv_transfer.grpc.client import KVPullClient

        try:
            params = KVTransferParams.from_proto(handle)
            params.verify(self.cluster_secret)  # dial only addresses a prefill pod of this cluster signed
        except KVHandleError:
            return
        secret = self.cluster_secret

        def release() -> None:
            client = KVPullClient(None, secret)
            try:
                client.release(params.kv_server or "", params.transfer_id)
            finally:
                client.close()

        await asyncio.to_thread(release)

    async def check_health(self, pod: Endpoint, timeout_s: float) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel(pod))
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError):
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        subs, self._subscriptions = list(self._subscriptions.values()), {}
        for sub in subs:
            await sub.close()
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
