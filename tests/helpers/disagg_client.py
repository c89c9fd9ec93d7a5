"""The smallest client of the pods' ``Prefill`` and ``Decode`` calls, for tests of the disaggregated services.

Each request goes to a prefill pod, then to a decode pod (the router does the same with pod selection, retries and
resumption): the prefill pod returns the first token and the KV handle; the decode pod gets the prompt followed by
that token, the handle, and the remaining token budget, and streams the rest as the Generation API's stream.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import grpc

from pdserve.engine.security import ClusterSecret
from pdserve.proto.pdserve.v1 import disagg_pb2, disagg_pb2_grpc
from pdserve.proto.pdserve.v1 import generate_pb2 as pb
from pdserve.services.api.auth import ENGINE_SCOPE

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class DisaggClient:
    """Talks to one prefill pod and one decode pod (``host:port`` of their gRPC servers).

    With a ``cluster_secret`` every call carries a fresh call token (pods holding the secret require one)."""

    def __init__(self, prefill: str, decode: str, timeout_s: float = 600.0,
                 cluster_secret: ClusterSecret | None = None) -> None:
        self.cluster_secret = cluster_secret
        self._prefill_channel = grpc.aio.insecure_channel(prefill, options=_OPTIONS)
        self._decode_channel = grpc.aio.insecure_channel(decode, options=_OPTIONS)
        self.prefill = disagg_pb2_grpc.PrefillStub(self._prefill_channel)
        self.decode = disagg_pb2_grpc.DecodeStub(self._decode_channel)
        self.timeout_s = timeout_s

    def signed(self, metadata: Any = None) -> Any:
        """``metadata`` plus this call's token (when the proxy holds the cluster secret)."""
        if self.cluster_secret is None:
            return metadata
        return (*(metadata or ()), *self.cluster_secret.call_headers(ENGINE_SCOPE).items())

    async def close(self) -> None:
        await self._prefill_channel.close()
        await self._decode_channel.close()

    async def generate(self, request: Any, metadata: Any = None) -> AsyncIterator[Any]:
        """Serve one ``GenerateRequest``: the first token from the prefill pod, the rest from the decode pod.

        gRPC errors of either pod propagate as ``grpc.aio.AioRpcError`` (status and message unchanged).
        """
        pre = await self.prefill.Prefill(disagg_pb2.PrefillRequest(request=request), timeout=self.timeout_s,
                                         metadata=self.signed(metadata))
        first = pre.choice
        n_prompt, n_first = len(pre.prompt_token_ids), len(first.token_ids)
        yield pb.GenerateResponse(request_id=pre.request_id, choices=[first])
        if first.finish_reason:
            yield _usage(pre.request_id, n_prompt, n_first)
            return
        params = pb.SamplingParams()
        params.CopyFrom(request.sampling_params)
        params.max_tokens = pre.max_tokens - n_first
        if params.HasField("min_tokens"):
            params.min_tokens = max(0, params.min_tokens - n_first)
        follow = pb.GenerateRequest(request_id=pre.request_id, model=request.model, user=request.user,
                                    token_ids=pb.TokenIds(ids=list(pre.prompt_token_ids) + list(first.token_ids)),
                                    sampling_params=params)
        decode_req = disagg_pb2.DecodeRequest(request=follow)
        if pre.HasField("kv_transfer_params"):
            decode_req.kv_transfer_params.CopyFrom(pre.kv_transfer_params)
        async for resp in self.decode.Decode(decode_req, timeout=self.timeout_s, metadata=self.signed(metadata)):
            if resp.HasField("usage"):
                yield _usage(pre.request_id, n_prompt, n_first + resp.usage.completion_tokens)
            else:
                yield resp

    async def complete(self, request: Any) -> tuple[list[int], str, str]:
        """The whole answer of one request: (token ids, text, finish reason)."""
        ids, text, finish = [], [], ""
        async for resp in self.generate(request):
            for choice in resp.choices:
                ids.extend(choice.token_ids)
                text.append(choice.text)
                finish = choice.finish_reason or finish
        return ids, "".join(text), finish


def _usage(request_id: str, n_prompt: int, n_completion: int) -> Any:
    return pb.GenerateResponse(request_id=request_id, usage=pb.Usage(
        prompt_tokens=n_prompt, completion_tokens=n_completion, total_tokens=n_prompt + n_completion))
