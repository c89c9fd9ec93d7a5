"""The decode pod's ``pdserve.v1.Decode`` service: load a prompt's KV by its handle, then stream the rest.

The request carries the prompt followed by the prefill's first token (as token ids) and the transfer handle. The
engine runs in the ``decode`` role: the scheduler admits the request, the connector loads the blocks the pod does
not already hold while other requests keep decoding, and generation continues after the first token. When the
load fails (missing or corrupt blocks, an incompatible peer, a dead prefill pod, an expired lease), the
``recompute`` policy computes the missing KV here and the answer is the same; under ``fail`` the call ends with
FAILED_PRECONDITION and the reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

import grpc

from pdserve.engine.kv_transfer.base import KVTransferParams
from pdserve.proto.pdserve.v1 import disagg_pb2_grpc
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.services.api.errors import ApiError, bad_request, from_exception
from pdserve.services.api.grpc_server import GenerationServicer
from pdserve.services.api.serving_common import new_id
from pdserve.services.api.tracing import PodCallSpan

logger = logging.getLogger(__name__)


class DecodeServicer(disagg_pb2_grpc.DecodeServicer):
    """``Decode`` on an engine client whose engine runs in the ``decode`` role."""

    def __init__(self, generation: GenerationServicer) -> None:
        self.gen = generation
        self.engine = generation.engine

    async def Decode(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        received = time.time()
        with PodCallSpan("pdserve.v1.Decode/Decode", context) as span:
            responses = self._decode(request, context, received, span)
            async for msg in self.gen.hub.deliver(request.request, context, responses):
                yield msg

    async def _decode(self, request: Any, context: grpc.aio.ServicerContext, received: float,
                      span: PodCallSpan) -> AsyncIterator[Any]:
        settings = self.gen.settings
        try:
            if request.request.WhichOneof("prompt") != "token_ids":
                raise bad_request("a decode request's prompt must be token ids (the prompt and the prefill's "
                                  "first token)", param="prompt")
            prompt, params = await self.gen.prepare(request.request)
            handle = None
            if request.HasField("kv_transfer_params"):
                try:
                    handle = KVTransferParams.from_proto(request.kv_transfer_params).to_dict()
                except ValueError as exc:
                    raise bad_request(str(exc), param="kv_transfer_params") from None
            request_id = request.request.request_id or new_id("decode")
            stream = self.engine.generate(prompt.token_ids, params, request_id, stream=True,
                                          kv_transfer_params=handle)
        except Exception as exc:
            await self.gen.abort_call(context, from_exception(exc, settings.retry_after_s))
            return
        completion_tokens = 0
        try:
            async for out in stream:
                comp = out.outputs[0]
                if comp.finish_reason == "abort" and comp.stop_reason:
                    # The engine ended it (its reason rides in stop_reason): under the fail policy, a failed load.
                    raise ApiError(409, str(comp.stop_reason))
                first = completion_tokens == 0 and bool(comp.token_ids)
                completion_tokens += len(comp.token_ids)
                msg = pb.GenerateResponse(request_id=request_id, choices=[pb.Choice(
                    index=comp.index, text=comp.text, token_ids=comp.token_ids,
                    logprobs=[self.gen.token_logprob(row) for row in comp.logprobs or []],
                    prompt_logprobs=self.gen.prompt_logprobs(out.prompt_logprobs),
                    finish_reason=comp.finish_reason or "",
                    stop_reason="" if comp.stop_reason is None else str(comp.stop_reason))])
                timing = self.gen.pod_timing(out, received, span) if first else None
                if timing is not None:
                    msg.timing.CopyFrom(timing)  # the router's timeline: this pod's marks, with the first token
                yield msg
        except ApiError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION if exc.status == 409
                                else grpc.StatusCode.INTERNAL, exc.message)
            return
        except Exception as exc:
            await self.gen.abort_call(context, from_exception(exc, settings.retry_after_s))
            return
        finally:
            stream.close()
        n_prompt = len(prompt.token_ids)
        yield pb.GenerateResponse(request_id=request_id, usage=pb.Usage(
            prompt_tokens=n_prompt, completion_tokens=completion_tokens, total_tokens=n_prompt + completion_tokens))


def add_decode_service(server: grpc.aio.Server, generation: GenerationServicer) -> None:
    disagg_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(generation), server)
