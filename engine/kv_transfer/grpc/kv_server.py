"""The prefill pod's KV server (``KVTransfer`` in kv_transfer.proto; the decode side's client is :mod:`.client`).

A finished prefill's blocks stay in the pod's KV cache under a lease (:class:`TransferRegistry`). A decode pod
calls ``PullBlocks``: the server reads the blocks straight from the paged cache, a few at a time, and streams
each as a header then payload chunks of ``chunk_bytes``; HTTP/2 flow control holds the server back when the
reader is slower, and the caller's deadline bounds the whole pull. ``Release`` ends the lease early (the
decode pod has the blocks, or gave up). While a pull is streaming its transfer cannot expire, so the blocks it
reads are never reused under it.

On one node a decode process can skip the stream: ``ShareCache`` hands it CUDA IPC handles of the cache once,
``LocateBlocks`` names a transfer's block ids (and pins the transfer while the caller copies), and the caller
copies device to device, then calls ``Release`` (see :mod:`.cuda_ipc`).

Every RPC needs a fresh call token of the cluster secret (``x-pdserve-auth``, scope ``kv``) in its metadata, else
``UNAUTHENTICATED``; a KV server does not start without the secret. The server bounds what a caller may ask for:
``chunk_bytes`` is clamped to [``MIN_CHUNK_BYTES``, ``MAX_CHUNK_BYTES``], ``pin_seconds`` to [1 s, the lease]
(``inf``/NaN refused), concurrent RPCs to ``max_concurrent_rpcs`` (more get ``RESOURCE_EXHAUSTED``) and a pull's
duration to ``max_pull_s``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import grpc

from pdserve.engine.core.block_hash import hash_to_bytes
from pdserve.engine.kv_transfer.block_format import KVDescriptor, KVFormatError, header_to_proto, make_header
from pdserve.engine.kv_transfer.grpc.transfers import TransferRegistry
from pdserve.engine.security import AUTH_HEADER, AuthError, ClusterSecret

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20  # a whole block of an 8B model (2 MiB in bf16) travels as one message
_BLOCKS_PER_GATHER = 8  # blocks read from the cache at once: bounds the host memory of one pull
MAX_MESSAGE = 64 << 20
MIN_CHUNK_BYTES = 64 << 10  # a client asking for 1-byte chunks would make the server send millions of messages
MAX_CHUNK_BYTES = MAX_MESSAGE - (1 << 20)  # room for the header within one message
DEFAULT_MAX_CONCURRENT_RPCS = 32
DEFAULT_MAX_PULL_S = 120.0
AUTH_SCOPE = "kv"
# A pull may arrive between the prefill's answer and the next engine step, which registers its transfer.
REGISTER_WAIT_S = 1.0


def clamp_chunk_bytes(requested: int) -> int:
    """The chunk size the server uses for a request's ``chunk_bytes`` (0: the default)."""
    if requested <= 0:
        return DEFAULT_CHUNK_BYTES
    return max(MIN_CHUNK_BYTES, min(int(requested), MAX_CHUNK_BYTES))


class KVTransferServicer:
    """Serves the blocks of registered transfers from ``get_kv_caches()`` (the engine's per-layer tensors)."""

    def __init__(self, registry: TransferRegistry, descriptor: KVDescriptor,
                 get_kv_caches: Callable[[], Sequence[Any]], on_sent: Callable[[int, int], None] | None = None,
                 max_pin_s: float = 60.0, max_pull_s: float = DEFAULT_MAX_PULL_S, mac_key: bytes | None = None
                 ) -> None:
        self.registry = registry
        self.mac_key = mac_key  # blocks sent carry a MAC (the decode side checks it: a pod can be impersonated)
        self.max_pin_s = max(1.0, float(max_pin_s))
        self.max_pull_s = float(max_pull_s)
        self.descriptor = descriptor
        self._get_kv_caches = get_kv_caches
        self._on_sent = on_sent
        self._share = None  # cuda_ipc.SharedCache, made on the first ShareCache call
        self._share_lock = threading.Lock()

    def _check_descriptor(self, msg: Any, context: grpc.ServicerContext) -> None:
        try:
            theirs = KVDescriptor.from_proto(msg)
        except KVFormatError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        diff = self.descriptor.mismatches(theirs)
        if diff:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "incompatible KV cache: " + "; ".join(diff))

    def PullBlocks(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        from pdserve.engine.kv_transfer import kv_layout
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        self._check_descriptor(request.descriptor, context)
        blocks = self.registry.begin_pull(request.transfer_id, REGISTER_WAIT_S)
        if blocks is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no KV transfer {request.transfer_id!r} here (never "
                                                     f"registered, released, or its lease expired)")
        try:
            first, count = request.first_block, request.num_blocks
            wanted = blocks[first:first + count] if count else blocks[first:]
            chunk = clamp_chunk_bytes(request.chunk_bytes)
            sent_blocks = sent_bytes = 0
            deadline = time.monotonic() + self.max_pull_s  # whatever deadline the caller set (or none)
            for start in range(0, len(wanted), _BLOCKS_PER_GATHER):
                if time.monotonic() > deadline:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"a pull may take at most {self.max_pull_s:.0f} s")
                group = wanted[start:start + _BLOCKS_PER_GATHER]
                stage = kv_layout.gather_blocks(self._get_kv_caches(), [b.block_id for b in group])
                for j, ref in enumerate(group):
                    payload = kv_layout.payload_from_stage(stage, j, ref.num_tokens)
                    header = header_to_proto(make_header(self.descriptor, ref.block_hash, ref.num_tokens, payload,
                                                             self.mac_key))
                    if len(payload) <= chunk:
                        yield pb.KVChunk(block_index=ref.index, header=header, data=payload)
                    else:
                        for offset in range(0, len(payload), chunk):
                            yield pb.KVChunk(block_index=ref.index, header=header if offset == 0 else None,
                                             data=payload[offset:offset + chunk])
                    sent_blocks += 1
                    sent_bytes += len(payload)
            if self._on_sent is not None:
                self._on_sent(sent_blocks, sent_bytes)
        finally:
            self.registry.end_pull(request.transfer_id)

    def ShareCache(self, request: Any, context: grpc.ServicerContext) -> Any:
        from pdserve.engine.kv_transfer.grpc import cuda_ipc
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        self._check_descriptor(request.descriptor, context)
        caches = self._get_kv_caches()
        if not caches or not caches[0].is_cuda:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this pod's KV cache is not on a GPU: no CUDA IPC")
        if request.node_id != cuda_ipc.node_id():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "CUDA IPC needs the caller on this pod's node")
        with self._share_lock:
            if self._share is None:
                self._share = cuda_ipc.share_cache(caches, cache_id=uuid.uuid4().hex)
            share = self._share
        return pb.CacheShare(node_id=share.node_id, gpu_uuid=share.gpu_uuid, cache_id=share.cache_id,
                             layers=list(share.layers), process_id=cuda_ipc.PROCESS_ID)

    def LocateBlocks(self, request: Any, context: grpc.ServicerContext) -> Any:
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        self._check_descriptor(request.descriptor, context)
        pin = float(request.pin_seconds)
        if not math.isfinite(pin):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "pin_seconds must be a finite number of seconds")
        blocks = self.registry.pin(request.transfer_id, min(max(pin, 1.0), self.max_pin_s), REGISTER_WAIT_S)
        if blocks is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no KV transfer {request.transfer_id!r} here (never "
                                                     f"registered, released, or its lease expired)")
        first, count = request.first_block, request.num_blocks
        wanted = blocks[first:first + count] if count else blocks[first:]
        return pb.BlockLocations(
            cache_id=self._share.cache_id if self._share is not None else "",
            blocks=[pb.BlockLocation(block_index=b.index, block_id=b.block_id, block_hash=hash_to_bytes(b.block_hash),
                                     num_tokens=b.num_tokens) for b in wanted])

    def Release(self, request: Any, context: grpc.ServicerContext) -> Any:
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        return pb.ReleaseResponse(released=self.registry.release(request.transfer_id))


class _AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a fresh ``x-pdserve-auth`` token of the cluster secret (``UNAUTHENTICATED``)."""

    def __init__(self, secret: ClusterSecret) -> None:
        self._secret = secret

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        token = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        try:
            self._secret.verify_call(AUTH_SCOPE, token)
        except AuthError as exc:
            return _refusal(continuation(handler_call_details), str(exc))
        return continuation(handler_call_details)


def _refusal(handler: Any, message: str) -> Any:
    """A handler of the same shape as ``handler`` that aborts with ``UNAUTHENTICATED``."""
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(abort, handler.request_deserializer, handler.response_serializer)


def start_kv_server(servicer: KVTransferServicer, host: str, port: int, secret: ClusterSecret | None,
                    max_workers: int = 8, max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
                    ) -> tuple[grpc.Server, int]:
    """Start a gRPC server with the KV service on ``host:port`` (port 0: any free one); returns it and its port.

    Raises ``ValueError`` without a cluster secret: the server hands out prompt KV, only to pdserve's own pods."""
    from concurrent import futures

    from pdserve.proto.pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc

    if secret is None:
        raise ValueError("the grpc KV connector's KV server needs the cluster secret: set PDSERVE_CLUSTER_SECRET "
                         "or PDSERVE_CLUSTER_SECRET_FILE (the same on prefill and decode pods)")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-server"),
                         interceptors=[_AuthInterceptor(secret)], maximum_concurrent_rpcs=max_concurrent_rpcs,
                         options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE)])
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the KV server to {host}:{port}")
    server.start()
    return server, bound
