"""The decode pod's client of prefill pods' KV servers: pulls, locates and releases transfers.

Every call carries a fresh call token of the cluster secret. Channels are cached per KV server address, at most
``MAX_CHANNELS`` of them (least recently used closed first): a decode pod talks to many prefill pods over time."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import grpc

from pdserve.engine.core.block_hash import hash_to_bytes
from pdserve.engine.kv_transfer.base import BlockRef
from pdserve.engine.kv_transfer.block_format import (KVDescriptor, KVFormatError, check_header, header_from_proto,
                                                     verify_mac, verify_payload)
from pdserve.engine.kv_transfer.grpc.kv_server import AUTH_SCOPE, DEFAULT_CHUNK_BYTES, MAX_MESSAGE
from pdserve.engine.security import ClusterSecret

logger = logging.getLogger(__name__)


class PullError(Exception):
    """A pull that failed; ``reason`` is the metrics label, ``num_valid_blocks`` how many blocks did land."""

    def __init__(self, reason: str, message: str, num_valid_blocks: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.num_valid_blocks = num_valid_blocks


MAX_CHANNELS = 64
_DEADLINE_GRACE_S = 1.0  # past a pull's deadline, the client cancels the call itself (see pull)

_CODE_REASONS = {grpc.StatusCode.UNAVAILABLE: "peer_gone", grpc.StatusCode.NOT_FOUND: "lease_expired",
                 grpc.StatusCode.DEADLINE_EXCEEDED: "timeout", grpc.StatusCode.FAILED_PRECONDITION: "incompatible",
                 grpc.StatusCode.UNAUTHENTICATED: "unauthenticated"}


class _Stalled(Exception):
    """The stream missed its deadline without ending (see :func:`_messages`)."""


_END = object()


def _messages(call: Any, deadline: float) -> Iterator[Any]:
    """The messages of a server stream, read by a daemon thread and handed over here, until ``deadline``.

    grpc enforces the call's own deadline, but a stream whose server stops under it can hang past it in grpc's
    core, even through ``cancel()`` (seen with both ends in one process: a KV server shut down while a pull
    starts). The caller's thread never waits in grpc: past ``deadline`` it cancels the call, raises
    :class:`_Stalled` and leaves the reader thread behind; every block is verified and written by the caller,
    so an abandoned reader never touches the cache."""
    handed: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        try:
            for msg in call:
                handed.put(msg)
            handed.put(_END)
        except BaseException as exc:  # grpc.RpcError, or anything else: the caller raises it
            handed.put(exc)

    threading.Thread(target=read, name="kv-pull-stream", daemon=True).start()
    try:
        while True:
            try:
                item = handed.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise _Stalled() from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        call.cancel()  # stalled, or the caller stopped reading (a bad block): end the stream (no-op once ended)


class KVPullClient:
    """Pulls transfers from KV servers, one cached channel per server address."""

    def __init__(self, descriptor: KVDescriptor | None, secret: ClusterSecret | None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_channels: int = MAX_CHANNELS) -> None:
        self.descriptor = descriptor  # None: a client that only releases
        self.secret = secret
        self.mac_key = secret.derive("kv-block") if secret is not None else None
        self.chunk_bytes = chunk_bytes
        self.max_channels = max(1, max_channels)
        self._lock = threading.Lock()
        self._channels: OrderedDict[str, grpc.Channel] = OrderedDict()

    def _metadata(self) -> list[tuple[str, str]]:
        return list(self.secret.call_headers(AUTH_SCOPE).items()) if self.secret is not None else []

    def pull(self, address: str, transfer_id: str, blocks: Sequence[BlockRef], timeout_s: float,
             on_block: Callable[[BlockRef, memoryview], None], descriptor: KVDescriptor | None = None) -> int:
        """Stream ``blocks`` (consecutive, by index) of a transfer; call ``on_block`` for each verified payload.

        ``descriptor``: the server's cache, when it is another tensor-parallel shard of this model than the
        client's own (see head_shards). Returns the payload bytes received. Raises :class:`PullError` (after
        calling ``on_block`` for the blocks that did arrive whole and valid).
        """
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        desc = descriptor or self.descriptor
        stub = self._stub(address)
        by_index = {b.index: b for b in blocks}
        req = pb.PullBlocksRequest(transfer_id=transfer_id, descriptor=desc.to_proto(),
                                   first_block=blocks[0].index, num_blocks=len(blocks),
                                   chunk_bytes=self.chunk_bytes)
        done, nbytes = 0, 0
        ref, header, buf, filled = None, None, None, 0
        call = stub.PullBlocks(req, timeout=timeout_s, metadata=self._metadata())
        try:
            for msg in _messages(call, time.monotonic() + timeout_s + _DEADLINE_GRACE_S):
                if msg.HasField("header"):
                    ref = by_index.get(msg.block_index)
                    if ref is None or done >= len(blocks) or ref.index != blocks[done].index:
                        raise KVFormatError(f"KV server sent block {msg.block_index} out of order")
                    header = header_from_proto(msg.header)
                    check_header(header, desc, ref.block_hash, ref.num_tokens)
                    if len(msg.data) == header.payload_bytes:  # the whole block in one message: no copy
                        self._verify(header, msg.data)
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
                    self._verify(header, buf)
                    on_block(ref, memoryview(buf))
                    done += 1
                    nbytes += filled
                    buf = None
        except grpc.RpcError as exc:
            code = exc.code()
            raise PullError(_CODE_REASONS.get(code, "error"), f"pulling KV transfer {transfer_id} from {address} "
                                                              f"failed: {code.name}: {exc.details()}", done) from None
        except _Stalled:
            raise PullError("timeout", f"pulling KV transfer {transfer_id} from {address}: no answer "
                                       f"{_DEADLINE_GRACE_S:.0f} s past the {timeout_s:g} s deadline", done) from None
        except KVFormatError as exc:
            raise PullError(exc.reason, str(exc), done) from None
        if done < len(blocks):
            raise PullError("missing", f"KV server {address} sent {done} of {len(blocks)} blocks of transfer "
                                       f"{transfer_id}", done)
        return nbytes

    def _verify(self, header: Any, payload: Any) -> None:
        verify_payload(header, payload)
        if self.mac_key is not None:
            verify_mac(self.mac_key, header, payload)

    def share_cache(self, address: str, node: str, timeout_s: float) -> Any:
        """The KV server's ``CacheShare`` (CUDA IPC handles); raises ``grpc.RpcError`` when it will not share."""
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        return self._stub(address).ShareCache(pb.ShareCacheRequest(descriptor=self.descriptor.to_proto(),
                                                                   node_id=node), timeout=timeout_s,
                                                              metadata=self._metadata())

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
            reply = self._stub(address).LocateBlocks(req, timeout=timeout_s, metadata=self._metadata())
        except grpc.RpcError as exc:
            code = exc.code()
            raise PullError(_CODE_REASONS.get(code, "error"), f"locating KV transfer {transfer_id} at {address} "
                                                              f"failed: {code.name}: {exc.details()}", 0) from None
        theirs = list(reply.blocks)
        if len(theirs) != len(blocks):
            raise PullError("missing", f"KV server {address} holds {len(theirs)} of {len(blocks)} blocks of "
                                       f"transfer {transfer_id}", 0)
        for ref, loc in zip(blocks, theirs):
            if (loc.block_index, loc.block_hash, loc.num_tokens) != (ref.index, hash_to_bytes(ref.block_hash),
                                                                     ref.num_tokens):
                raise PullError("missing", f"block {ref.index} of transfer {transfer_id} at {address} holds "
                                           f"other tokens than the handle names", 0)
        return reply.cache_id, [loc.block_id for loc in theirs]

    def release(self, address: str, transfer_id: str, timeout_s: float = 2.0) -> bool:
        """Tell the KV server to free the transfer's blocks (best effort: False if it could not be told).

        ``address`` may name several servers, comma-separated (a tensor-parallel prefill engine: one per rank);
        each is told."""
        if "," in address:
            told = [self.release(a, transfer_id, timeout_s) for a in address.split(",")]
            return all(told)
        from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

        try:
            self._stub(address).Release(pb.ReleaseRequest(transfer_id=transfer_id), timeout=timeout_s,
                                        metadata=self._metadata())
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
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                    ("grpc.max_send_message_length", MAX_MESSAGE)])
                self._channels[address] = channel
                while len(self._channels) > self.max_channels:
                    _, oldest = self._channels.popitem(last=False)
                    oldest.close()
            else:
                self._channels.move_to_end(address)
            return pb_grpc.KVTransferStub(channel)
