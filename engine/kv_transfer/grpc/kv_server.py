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
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import grpc
from pdserve.engine.kv_transfer.block_format import KVDescriptor, KVFormatError, header_to_proto, make_header
from pdserve.engine.kv_transfer.grpc.transfers import TransferRegistry

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20  # a whole block of an 8B model (2 MiB in bf16) travels as one message
_BLOCKS_PER_GATHER = 8  # blocks read from the cache at once: bounds the host memory of one pull
MAX_MESSAGE = 64 << 20


class KVTransferServicer:
    """Serves the blocks of registered transfers from ``get_kv_caches()`` (the engine's per-layer tensors)."""

    def __init__(self, registry: TransferRegistry, descriptor: KVDescriptor,
                 get_kv_caches: Callable[[], Sequence[Any]], on_sent: Callable[[int, int], None] | None = None
                 ) -> None:
        self.registry = registry
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
        blocks = self.registry.begin_pull(request.transfer_id)
        if blocks is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no KV transfer {request.transfer_id!r} here (never "
                                                     f"registered, released, or its lease expired)")
        try:
            first, count = request.first_block, request.num_blocks
            wanted = blocks[first:first + count] if count else blocks[first:]
            chunk = request.chunk_bytes or DEFAULT_CHUNK_BYTES
            sent_blocks = sent_bytes = 0
            for start in range(0, len(wanted), _BLOCKS_PER_GATHER):
                group = wanted[start:start + _BLOCKS_PER_GATHER]
                stage = kv_layout.gather_blocks(self._get_kv_caches(), [b.block_id for b in group])
                for j, ref in enumerate(group):
                    payload = kv_layout.payload_from_stage(stage, j, ref.num_tokens)
                    header = header_to_proto(make_header(self.descriptor, ref.block_hash, ref.num_tokens, payload))
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
        blocks = self.registry.pin(request.transfer_id, max(float(request.pin_seconds), 1.0))
        if blocks is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no KV transfer {request.transfer_id!r} here (never "
                                                     f"registered, released, or its lease expired)")
        first, count = request.first_block, request.num_blocks
        wanted = blocks[first:first + count] if count else blocks[first:]
        return pb.BlockLocations(
            cache_id=self._share.cache_id if self._share is not None else "",
            blocks=[pb.BlockLocation(block_index=b.index, block_id=b.block_id, block_hash=b.block_hash,
                                     num_tokens=b.num_tokens) for b in wanted])

    def Release(self, request: Any, context: grpc.ServicerContext) -> Any:
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        return pb.ReleaseResponse(released=self.registry.release(request.transfer_id))


def start_kv_server(servicer: KVTransferServicer, host: str, port: int, max_workers: int = 8
                    ) -> tuple[grpc.Server, int]:
    """Start a gRPC server with the KV service on ``host:port`` (port 0: any free one); returns it and its port."""
    from concurrent import futures

    from pdserve.proto.pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-server"),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE)])
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the KV server to {host}:{port}")
    server.start()
    return server, bound
