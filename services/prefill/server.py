"""The prefill pod's ``pdserve.v1.Prefill`` service: compute a prompt, save its KV, return the first token.

The request is the Generation API's ``GenerateRequest`` (same validation, same errors). The engine runs in the
``prefill`` role: it computes the prompt (reusing its own prefix cache), samples the first token with the request's
own sampling parameters, saves the prompt's KV through the connector while the forward pass runs, and hands back
the transfer handle. A request that ends at its first token (EOS, a stop string, ``max_tokens`` 1) needs no
decode: its blocks are released at once and no handle is returned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import grpc

from pdserve.engine.kv_transfer.base import KVTransferParams
from pdserve.engine.security import ClusterSecret
from pdserve.proto.pdserve.v1 import disagg_pb2, disagg_pb2_grpc
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.services.api.errors import bad_request, from_exception
from pdserve.services.api.grpc_server import GenerationServicer
from pdserve.services.api.serving_common import new_id
from pdserve.services.api.tracing import PodCallSpan

logger = logging.getLogger(__name__)


class PrefillServicer(disagg_pb2_grpc.PrefillServicer):
    """``Prefill`` on an engine client whose engine runs in the ``prefill`` role."""

    def __init__(self, generation: GenerationServicer) -> None:
        self.gen = generation
        self.engine = generation.engine

    async def Prefill(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        received = time.time()
        with PodCallSpan("pdserve.v1.Prefill/Prefill", context) as span:
            return await self._prefill(request, context, received, span)

    async def _prefill(self, request: Any, context: grpc.aio.ServicerContext, received: float,
                       span: PodCallSpan) -> Any:
        settings = self.gen.settings
        try:
            prompt, params = await self.gen.prepare(request.request)
            if params.n != 1:
                raise bad_request("n must be 1 for a disaggregated request (send n > 1 to a decode or monolithic "
                                  "server)", param="n")
            first = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
            request_id = request.request.request_id or new_id("prefill")
            stream = self.engine.generate(prompt.token_ids, first, request_id, stream=False,
                                          prompt_text=prompt.text)
        except Exception as exc:
            await self.gen.abort_call(context, from_exception(exc, settings.retry_after_s))
            return
        try:
            final, prompt_lp = None, None
            async for out in stream:
                final = out
                # With the first token (a streamed request sends them once): not always the final output.
                prompt_lp = prompt_lp or out.prompt_logprobs
        except Exception as exc:
            await self.gen.abort_call(context, from_exception(exc, settings.retry_after_s))
            return
        finally:
            stream.close()
        comp = final.outputs[0]
        if comp.finish_reason == "abort":
            reason = str(comp.stop_reason or "the engine aborted the request")
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        handle = getattr(final, "kv_transfer_params", None)
        # Ended for good at the first token? EOS / stop: "stop"; otherwise only if the client asked for one token
        # or the context is full.
        n_prompt = len(prompt.token_ids)
        finish = ""
        if comp.finish_reason == "stop":
            finish = "stop"
        elif params.max_tokens == 1 or n_prompt + 1 >= self.engine.max_model_len:
            finish = "length"
        if finish and handle:
            await release_transfer(handle, self.engine.config.kv_transfer.cluster_secret)
            handle = None
        choice = pb.Choice(index=0, text=comp.text, token_ids=comp.token_ids,
                           logprobs=[self.gen.token_logprob(row) for row in comp.logprobs or []],
                           prompt_logprobs=self.gen.prompt_logprobs(prompt_lp),
                           finish_reason=finish,
                           stop_reason="" if not finish or comp.stop_reason is None else str(comp.stop_reason))
        budget = params.max_tokens if params.max_tokens is not None else self.engine.max_model_len - n_prompt
        resp = disagg_pb2.PrefillResponse(request_id=request_id, prompt_token_ids=prompt.token_ids, choice=choice,
                                          num_cached_tokens=final.num_cached_tokens, max_tokens=budget)
        if handle:
            resp.kv_transfer_params.CopyFrom(KVTransferParams.from_dict(handle).to_proto())
        timing = self.gen.pod_timing(final, received, span)
        if timing is not None:
            resp.timing.CopyFrom(timing)  # the router's timeline: this pod's marks of the request
        return resp


async def release_transfer(handle: dict[str, Any], secret: ClusterSecret | None) -> None:
    """Free a transfer nobody will load (grpc connector: tell the KV server, with a call token of ``secret``;
    stores keep their blocks). Best effort: a server that cannot be told frees the blocks at the lease's end."""
    server = handle.get("kv_server")
    if not server:
        return
    from pdserve.engine.kv_transfer.grpc.client import KVPullClient

    def release() -> None:
        client = KVPullClient(None, secret)  # releasing needs no descriptor
        try:
            client.release(server, handle["transfer_id"])
        finally:
            client.close()

    await asyncio.to_thread(release)


def add_prefill_service(server: grpc.aio.Server, generation: GenerationServicer) -> None:
    disagg_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(generation), server)
