"""The gRPC API (``pdserve.v1.Generation``) plus the standard ``grpc.health.v1`` service, over any EngineClient.

Requests are converted into the HTTP API's request models and go through the same handlers' checks, so both
front ends accept and refuse exactly the same things; :data:`~.errors.GRPC_CODES` maps the HTTP status of an
:class:`ApiError` to a gRPC status code. Credentials and unparsable messages are checked before any method runs,
by the interceptor of :mod:`.grpc_guard`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable, Iterable, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError

from pdserve.engine.frontend.params_wire import pb_set_fields
from pdserve.engine.frontend.timing import PodMarks
from pdserve.engine.frontend.tokenizer import tokenize_async
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.proto.pdserve.v1 import generate_pb2_grpc as pb_grpc
from pdserve.services.api.app import validation_error
from pdserve.services.api.delta_hub import DeltaHub
from pdserve.services.api.engine_client import EngineClient
from pdserve.services.api.errors import GRPC_CODES, ApiError, bad_request, from_exception
from pdserve.services.api.grpc_guard import EdgeInterceptor
from pdserve.services.api.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.services.api.serving_chat import ChatServing, render_chat_async
from pdserve.services.api.serving_common import Prompt, merge_streams, new_id
from pdserve.services.api.settings import ServerSettings
from pdserve.services.api.structured import structured_outputs_async
from pdserve.services.api.tracing import PodCallSpan

logger = logging.getLogger(__name__)

SERVICE_NAME = "pdserve.v1.Generation"


def request_fields(req: pb.GenerateRequest) -> dict[str, Any]:
    """The request as the HTTP API's JSON fields (only those the client set)."""
    fields = pb_set_fields(req.sampling_params)
    if req.model:
        fields["model"] = req.model
    if req.user:
        fields["user"] = req.user
    return fields


class GenerationServicer(pb_grpc.GenerationServicer):
    """Implements ``pdserve.v1.Generation`` on an :class:`EngineClient`."""

    def __init__(self, engine: EngineClient, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.serving = ChatServing(engine, settings)  # its ServingBase checks serve both prompt kinds
        self.hub = DeltaHub()  # routers' Deltas subscriptions (services/api/delta_hub.py)

    async def abort_call(self, context: grpc.aio.ServicerContext, err: ApiError) -> NoReturn:
        """End the call with the error's status code (``context.abort`` raises)."""
        if err.retry_after is not None:
            context.set_trailing_metadata((("retry-after", str(err.retry_after)),))
        await context.abort(getattr(grpc.StatusCode, GRPC_CODES.get(err.status, "INTERNAL")), err.message)

    async def prepare(self, req: pb.GenerateRequest) -> tuple[Prompt, Any]:
        """The prompt (tokenized) and SamplingParams of a ``GenerateRequest``, validated as the HTTP API does."""
        try:
            fields = request_fields(req)
        except ValueError as exc:  # a malformed message-typed field (structured_outputs without a constraint)
            raise bad_request(str(exc), param="structured_outputs") from None
        # Not an HTTP field: the router's count of prompt tokens that are the sequence's own output (after a
        # prefill pod's first token or a resume), applied to the engine's parameters below.
        generated = fields.pop("num_generated_prompt_tokens", 0)
        kind = req.WhichOneof("prompt")
        try:
            if kind == "chat":
                messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
                gen_prompt = req.chat.add_generation_prompt if req.chat.HasField("add_generation_prompt") else True
                model = ChatCompletionRequest.model_validate({**fields, "messages": messages,
                                                              "add_generation_prompt": gen_prompt})
            elif kind in ("text", "token_ids"):
                prompt = req.text if kind == "text" else list(req.token_ids.ids)
                model = CompletionRequest.model_validate({**fields, "prompt": prompt})
            else:
                raise bad_request("the request has no prompt (set text, token_ids or chat)", param="prompt")
        except ValidationError as exc:
            raise validation_error(exc) from None
        self.serving.check_common(model)
        if isinstance(model, ChatCompletionRequest):
            if self.engine.tokenizer is None:
                raise bad_request("this model has no tokenizer, so chat is unavailable", param="messages")
            prompt_obj = await render_chat_async(self.engine.tokenizer, model.messages, model.add_generation_prompt,
                                                 chat_template=self.settings.chat_template)
            max_tokens = model.max_tokens
        else:
            try:
                prompt_obj = Prompt(await tokenize_async(self.engine.tokenize, model.prompt), model.prompt
                                    if isinstance(model.prompt, str) else None)  # type: ignore[arg-type]
            except ValueError as exc:
                raise bad_request(str(exc), param="prompt") from None
            max_tokens = model.max_tokens
        logprobs = fields.get("logprobs")
        structured = await structured_outputs_async(model)
        params = self.serving.sampling_params(model, max_tokens, logprobs, structured)
        if generated:
            try:
                params = dataclasses.replace(params, num_generated_prompt_tokens=generated)
            except ValueError as exc:
                raise bad_request(str(exc), param="num_generated_prompt_tokens") from None
            if generated >= len(prompt_obj.token_ids):
                raise bad_request(f"num_generated_prompt_tokens ({generated}) must be less than the prompt's "
                                  f"{len(prompt_obj.token_ids)} tokens", param="num_generated_prompt_tokens")
        return prompt_obj, params

    def pod_timing(self, out: Any, received: float, span: PodCallSpan | None = None) -> pb.PodTiming | None:
        """This pod's marks of a sequence whose output carries the engine's (``RequestOutput.timing``), for the
        router's per-request timeline (docs/observability.md), also recorded as ``span``'s child spans; None when
        the engine keeps none."""
        marks = getattr(out, "timing", None)
        if not marks:
            return None
        kv = getattr(getattr(self.engine, "config", None), "kv_transfer", None)
        role = kv.role if kv is not None else "both"
        connector = kv.connector if kv is not None else None
        pod_marks = PodMarks.from_engine(marks, received=received, sent=time.time(), role=role, connector=connector)
        if span is not None:
            span.add_phases(pod_marks)
        return pod_marks.to_pb(pb.PodTiming)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        received = time.time()
        with PodCallSpan("pdserve.v1.Generation/Generate", context) as span:
            async for msg in self.hub.deliver(request, context, self._generate(request, context, received, span)):
                yield msg

    async def Deltas(self, request: pb.DeltasRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DeltaBatch]:
        async for batch in self.hub.serve(request, context):
            yield batch

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, received: float,
                        span: PodCallSpan) -> AsyncIterator[pb.GenerateResponse]:
        try:
            prompt, params = await self.prepare(request)
            request_id = request.request_id or new_id("grpc")
            streams = self.serving.start([prompt], params, request_id, stream=True)
        except Exception as exc:
            await self.abort_call(context, from_exception(exc, self.settings.retry_after_s))
            return
        completion_tokens = 0
        timed: set[int] = set()  # sequences whose first token (and marks) went out
        try:
            async for _, out in merge_streams(streams):
                comp = out.outputs[0]
                completion_tokens += len(comp.token_ids)
                msg = pb.GenerateResponse(request_id=request_id, choices=[pb.Choice(
                    index=comp.index, text=comp.text, token_ids=comp.token_ids,
                    logprobs=[self.token_logprob(row) for row in comp.logprobs or []],
                    prompt_logprobs=self.prompt_logprobs(out.prompt_logprobs),
                    finish_reason=comp.finish_reason or "",
                    stop_reason="" if comp.stop_reason is None else str(comp.stop_reason))])
                if comp.index not in timed and comp.token_ids:
                    timed.add(comp.index)
                    msg.choices[0].num_cached_tokens = out.num_cached_tokens
                    timing = self.pod_timing(out, received, span)
                    if timing is not None:
                        msg.timing.CopyFrom(timing)
                yield msg
        except Exception as exc:
            await self.abort_call(context, from_exception(exc, self.settings.retry_after_s))
            return
        finally:
            for s in streams:
                s.close()
        n_prompt = len(prompt.token_ids)
        yield pb.GenerateResponse(request_id=request_id, usage=pb.Usage(
            prompt_tokens=n_prompt, completion_tokens=completion_tokens, total_tokens=n_prompt + completion_tokens))

    def prompt_logprobs(self, rows: list[Any] | None) -> list[pb.TokenLogprob]:
        """``RequestOutput.prompt_logprobs`` on the wire: the rows after the first prompt token's (which has none)."""
        return [self.token_logprob(row) for row in rows[1:]] if rows else []

    def token_logprob(self, row: list[Any]) -> pb.TokenLogprob:
        """One position's logprobs (the sampled token, then its top alternatives) as a ``TokenLogprob``."""
        head = row[0]
        return pb.TokenLogprob(token_id=head.token_id, token=self.serving.token_text(head), logprob=head.logprob,
                               rank=head.rank, top_logprobs=[pb.TopLogprob(
                                   token_id=lp.token_id, token=self.serving.token_text(lp), logprob=lp.logprob)
                                   for lp in row[1:]])

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            self.serving.check_model(request.model or None)
            tok = self.engine.tokenizer
            if tok is None:
                raise bad_request("this model has no tokenizer", param="text")
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = list(tok(request.text, add_special_tokens=special).input_ids)
        except Exception as exc:
            await self.abort_call(context, from_exception(exc, self.settings.retry_after_s))
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.engine.max_model_len)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        tok = self.engine.tokenizer
        return pb.ModelInfo(model_name=self.settings.model_name,
                            served_model_names=list(self.settings.served_model_names),
                            max_model_len=self.engine.max_model_len, vocab_size=len(tok) if tok is not None else 0)


class GrpcServer:
    """A started ``grpc.aio`` server with the generation and health services; :meth:`stop` shuts it down."""

    def __init__(self, server: grpc.aio.Server, health_task: asyncio.Task, port: int,
                 hub: DeltaHub | None = None) -> None:
        self.server = server
        self.port = port
        self._health_task = health_task
        self._hub = hub

    async def stop(self, grace_s: float = 5.0) -> None:
        self._health_task.cancel()
        if self._hub is not None:
            self._hub.close()  # the Deltas streams end as their last calls do, not at the grace's end
        await self.server.stop(grace_s)


# Accept the router's keepalive pings (services/router/backend.py: every 5 s, with or without a call). With grpc's
# defaults a server allows one ping per 5 minutes while it sends no data, so a call whose first token took longer
# than ~15 s (a long prefill, a busy CPU) ended in GOAWAY "too_many_pings" and the router dropped the pod.
KEEPALIVE_POLICY = [("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_ping_interval_without_data_ms", 4000),
                    ("grpc.http2.max_ping_strikes", 0)]


async def start_grpc_server(engine: EngineClient, settings: ServerSettings, host: str, port: int,
                            services: Iterable[Callable[[grpc.aio.Server, GenerationServicer], None]] = ()
                            ) -> GrpcServer:
    """Bind and start; ``port=0`` picks a free port (see :attr:`GrpcServer.port`).

    ``services``: more servicers to mount (e.g. a role's ``Prefill`` or ``Decode``), each added by a function
    given the server and the generation servicer (whose checks and conversions it may reuse).
    """
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_body_bytes), *KEEPALIVE_POLICY],
                             interceptors=[EdgeInterceptor(settings)],
                             maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None)
    generation = GenerationServicer(engine, settings)
    pb_grpc.add_GenerationServicer_to_server(generation, server)
    for add_service in services:
        add_service(server, generation)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()

    async def track_health() -> None:
        # The health service answers from a table; keep it in step with the engine.
        last = None
        while True:
            status = health_pb2.HealthCheckResponse.SERVING if engine.is_ready \
                else health_pb2.HealthCheckResponse.NOT_SERVING
            if status != last:
                for name in ("", SERVICE_NAME):
                    await health_servicer.set(name, status)
                last = status
            await asyncio.sleep(0.5)

    return GrpcServer(server, asyncio.create_task(track_health()), bound, generation.hub)
