"""The prefill pod's KV server and the decode pod's pull client (``KVTransfer`` in kv_transfer.proto).

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
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from pdserve.engine.kv_transfer.base import BlockRef
from pdserve.engine.kv_transfer.block_format import (KVDescriptor, KVFormatError, check_header, header_from_proto,
                                                     header_to_proto, make_header, verify_payload)

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20  # a whole block of an 8B model (2 MiB in bf16) travels as one message
_BLOCKS_PER_GATHER = 8  # blocks read from the cache at once: bounds the host memory of one pull
_MAX_MESSAGE = 64 << 20


@dataclass
class _Transfer:
    blocks: tuple[BlockRef, ...]
    expires_at: float
    active_pulls: int = 0


class TransferRegistry:
    """Transfers a producer holds for its peers: transfer id -> blocks, with a lease. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transfers: dict[str, _Transfer] = {}
        self._released: set[str] = set()

    def add(self, transfer_id: str, blocks: Sequence[BlockRef], lease_s: float) -> None:
        with self._lock:
            self._transfers[transfer_id] = _Transfer(tuple(blocks), time.monotonic() + lease_s)

    def begin_pull(self, transfer_id: str) -> tuple[BlockRef, ...] | None:
        """The transfer's blocks, pinned until :meth:`end_pull` (None when unknown or expired)."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                return None
            t.active_pulls += 1
            return t.blocks

    def pin(self, transfer_id: str, seconds: float) -> tuple[BlockRef, ...] | None:
        """The transfer's blocks, its lease extended to at least ``seconds`` from now (None when unknown or
        expired): a peer copying them itself (CUDA IPC) gets that long before they can be reused."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                return None
            t.expires_at = max(t.expires_at, time.monotonic() + seconds)
            return t.blocks

    def end_pull(self, transfer_id: str) -> None:
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is not None:
                t.active_pulls -= 1

    def release(self, transfer_id: str) -> bool:
        """The peer is done: forget the transfer; the worker reports it so the scheduler frees the blocks."""
        with self._lock:
            if self._transfers.pop(transfer_id, None) is None:
                return False
            self._released.add(transfer_id)
            return True

    def take_released(self) -> set[str]:
        with self._lock:
            out, self._released = self._released, set()
            return out

    def expire(self, now: float | None = None) -> list[str]:
        """Forget and return the transfers whose lease ran out (never one being pulled right now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [tid for tid, t in self._transfers.items() if t.expires_at <= now and t.active_pulls == 0]
            for tid in gone:
                del self._transfers[tid]
            return gone

    def __contains__(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._transfers

    def __len__(self) -> int:
        with self._lock:
            return len(self._transfers)


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
        from pdserve.engine.kv_transfer import cuda_ipc
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
                         options=[("grpc.max_send_message_length", _MAX_MESSAGE),
                                  ("grpc.max_receive_message_length", _MAX_MESSAGE)])
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the KV server to {host}:{port}")
    server.start()
    return server, bound


class PullError(Exception):
    """A pull that failed; ``reason`` is the metrics label, ``num_valid_blocks`` how many blocks did land."""

    def __init__(self, reason: str, message: str, num_valid_blocks: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.num_valid_blocks = num_valid_blocks


_CODE_REASONS = {grpc.StatusCode.UNAVAILABLE: "peer_gone", grpc.StatusCode.NOT_FOUND: "lease_expired",
                 grpc.StatusCode.DEADLINE_EXCEEDED: "timeout", grpc.StatusCode.FAILED_PRECONDITION: "incompatible"}


class KVPullClient:
    """Pulls transfers from KV servers, one cached channel per server address."""

    def __init__(self, descriptor: KVDescriptor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.descriptor = descriptor
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def pull(self, address: str, transfer_id: str, blocks: Sequence[BlockRef], timeout_s: float,
             on_block: Callable[[BlockRef, memoryview], None]) -> int:
        """Stream ``blocks`` (consecutive, by index) of a transfer; call ``on_block`` for each verified payload.

        Returns the payload bytes received. Raises :class:`PullError` (after calling ``on_block`` for the blocks
        that did arrive whole and valid).
        """
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        stub = self._stub(address)
        by_index = {b.index: b for b in blocks}
        req = pb.PullBlocksRequest(transfer_id=transfer_id, descriptor=self.descriptor.to_proto(),
                                   first_block=blocks[0].index, num_blocks=len(blocks),
                                   chunk_bytes=self.chunk_bytes)
        done, nbytes = 0, 0
        ref, header, buf, filled = None, None, None, 0
        try:
            for msg in stub.PullBlocks(req, timeout=timeout_s):
                if msg.HasField("header"):
                    ref = by_index.get(msg.block_index)
                    if ref is None or done >= len(blocks) or ref.index != blocks[done].index:
                        raise KVFormatError(f"KV server sent block {msg.block_index} out of order")
                    header = header_from_proto(msg.header)
                    check_header(header, self.descriptor, ref.block_hash, ref.num_tokens)
                    if len(msg.data) == header.payload_bytes:  # the whole block in one message: no copy
                        verify_payload(header, msg.data)
                        on_block(ref, memoryview(msg.data))
                        done += 1
                        nbytes += len(msg.data)
                        continue
                    buf, filled = bytearray(header.payload_bytes), 0
                if buf is None or filled + len(msg.data) > len(buf):
                    raise KVFormatError("KV server sent more payload than its header announced")
                buf[filled:filled + len(msg.data)] = msg.data
                filled += len(msg.data)
                if filled == len(buf):
                    verify_payload(header, buf)
                    on_block(ref, memoryview(buf))
                    done += 1
                    nbytes += filled
                    buf = None
        except grpc.RpcError as exc:
            code = exc.code()
            raise PullError(_CODE_REASONS.get(code, "error"), f"pulling KV transfer {transfer_id} from {address} "
                                                              f"failed: {code.name}: {exc.details()}", done) from None
        except KVFormatError as exc:
            raise PullError(exc.reason, str(exc), done) from None
        if done < len(blocks):
            raise PullError("missing", f"KV server {address} sent {done} of {len(blocks)} blocks of transfer "
                                       f"{transfer_id}", done)
        return nbytes

    def share_cache(self, address: str, node: str, timeout_s: float) -> Any:
        """The KV server's ``CacheShare`` (CUDA IPC handles); raises ``grpc.RpcError`` when it will not share."""
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        return self._stub(address).ShareCache(pb.ShareCacheRequest(descriptor=self.descriptor.to_proto(),
                                                                   node_id=node), timeout=timeout_s)

    def locate(self, address: str, transfer_id: str, blocks: Sequence[BlockRef], timeout_s: float
               ) -> tuple[str, list[int]]:
        """``(cache_id, the peer's block id of each of blocks)``, the transfer pinned for ``timeout_s``.

        Raises :class:`PullError` (nothing landed) for an unknown transfer, an incompatible cache, or a peer
        whose blocks do not hold what the handle promised (other hashes or token counts).
        """
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        req = pb.LocateBlocksRequest(transfer_id=transfer_id, descriptor=self.descriptor.to_proto(),
                                     first_block=blocks[0].index, num_blocks=len(blocks), pin_seconds=timeout_s)
        try:
            reply = self._stub(address).LocateBlocks(req, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            raise PullError(_CODE_REASONS.get(code, "error"), f"locating KV transfer {transfer_id} at {address} "
                                                              f"failed: {code.name}: {exc.details()}", 0) from None
        theirs = list(reply.blocks)
        if len(theirs) != len(blocks):
            raise PullError("missing", f"KV server {address} holds {len(theirs)} of {len(blocks)} blocks of "
                                       f"transfer {transfer_id}", 0)
        for ref, loc in zip(blocks, theirs):
            if (loc.block_index, loc.block_hash, loc.num_tokens) != (ref.index, ref.block_hash, ref.num_tokens):
                raise PullError("missing", f"block {ref.index} of transfer {transfer_id} at {address} holds "
                                           f"other tokens than the handle names", 0)
        return reply.cache_id, [loc.block_id for loc in theirs]

    def release(self, address: str, transfer_id: str, timeout_s: float = 2.0) -> bool:
        """Tell the KV server to free the transfer's blocks (best effort: False if it could not be told)."""
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        try:
            self._stub(address).Release(pb.ReleaseRequest(transfer_id=transfer_id), timeout=timeout_s)
            return True
        except grpc.RpcError as exc:
            logger.info("could not release KV transfer %s at %s: %s", transfer_id, address, exc.code().name)
            return False

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _stub(self, address: str) -> Any:
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2_grpc as pb_grpc

        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(address, options=[
                    ("grpc.max_receive_message_length", _MAX_MESSAGE),
                    ("grpc.max_send_message_length", _MAX_MESSAGE)])
                self._channels[address] = channel
            return pb_grpc.KVTransferStub(channel)
