"""The worker half of the ``grpc`` connector: decode pods pull blocks from the prefill pod's KV server over gRPC.

Producer (prefill pod): nothing is copied during the forward pass; when a request finishes, its blocks stay in
the KV cache under a lease (``kv_lease_s``, default 60 s), registered with the pod's KV server, and the transfer
handle names the server (``kv_server``). They are freed when the decode pod acknowledges (``Release``) or when the
lease runs out, whichever comes first.

Consumer (decode pod): the handle says where the blocks are; a loader thread pulls the blocks the pod lacks
(after its own prefix-cache hits), checks each header and checksum, copies them into the request's blocks and
releases the transfer. A dead peer, an expired lease, a deadline or a bad block is reported as a failed load.

Transport (``kv_transport``): ``stream`` pulls the blocks over the gRPC stream through host memory; ``ipc`` copies
them device to device out of the prefill pod's GPU cache over CUDA IPC (same node only, see :mod:`.cuda_ipc`),
and fails the load when that is impossible; ``auto`` (the default) uses IPC where the peer is on this node and
both caches are on GPUs, else the stream.

With tensor parallelism every rank runs this worker half on its own KV heads, with its own KV server; the handle
names every rank's server, comma-separated in rank order, and a loading rank pulls its heads from the servers
that hold them (:mod:`..head_shards`). Such a transfer is released by the scheduler half once every rank loaded.

This worker half owns the transfer registry the KV server serves from; the scheduler half (:mod:`.scheduler`)
tells it what to serve through the step's metadata and learns what was released or expired from
:meth:`get_finished` (it knows the server's address from construction). The KV server binds ``kv_host:kv_port``
(default all interfaces, a free port) and announces ``kv_advertise_host`` (default 127.0.0.1; a pod sets its own
IP).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import torch

from pdserve.engine.kv_transfer.base import (BlockRef, KVConnectorContext, KVConnectorMetadata, KVConnectorOutput,
                                             KVConnectorWorker, LoadFailure, LoadSpec)
from pdserve.engine.kv_transfer.grpc.client import KVPullClient, PullError
from pdserve.engine.kv_transfer.grpc.kv_server import DEFAULT_CHUNK_BYTES, KVTransferServicer, start_kv_server
from pdserve.engine.kv_transfer.grpc.transfers import TransferRegistry
from pdserve.engine.kv_transfer.head_shards import ShardPiece, load_plan, shard_descriptor
from pdserve.engine.kv_transfer.block_format import KVDescriptor
from pdserve.engine.kv_transfer.metrics import KVTransferStats

logger = logging.getLogger(__name__)


TRANSPORTS = ("auto", "stream", "ipc")
MAX_IPC_PEERS = 16


class GrpcConnectorWorker(KVConnectorWorker):
    """Runs the KV server (producer) and pulls transfers in loader threads (consumer)."""

    saves_unreported_layers = True  # it saves nothing per step: prefill pods serve KV from the cache

    def __init__(self, ctx: KVConnectorContext, stats: KVTransferStats) -> None:
        super().__init__(ctx)
        self.stats = stats
        self.registry = TransferRegistry()  # what the KV server serves; the scheduler half learns of it by metadata
        self.timeout_s = float(ctx.option("kv_load_timeout_s", 10.0))
        self._results: queue.SimpleQueue[Callable[[KVConnectorOutput], None]] = queue.SimpleQueue()
        self._inflight = 0
        self._lock = threading.Lock()
        self._client = KVPullClient(ctx.descriptor, ctx.cluster_secret,
                                    int(ctx.option("kv_chunk_bytes", DEFAULT_CHUNK_BYTES)))
        self.streams = int(ctx.option("kv_pull_streams", 4))
        self.transport = str(ctx.option("kv_transport", "auto"))
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown kv_transport {self.transport!r}; choose one of {', '.join(TRANSPORTS)}")
        # KV server address -> _IpcPeer, or None where IPC is impossible; bounded, least recently used dropped
        # (dropping unmaps the peer's cache)
        self._ipc_peers: OrderedDict[str, Any] = OrderedDict()
        self._ipc_lock = threading.Lock()
        self._copy_stream = None
        self.loads_by_transport = {"stream": 0, "ipc": 0}
        self._closed = False
        self._loader = ThreadPoolExecutor(max_workers=max(2, self.streams), thread_name_prefix="kv-pull")
        self.server, self.address = None, None
        if ctx.is_producer:
            servicer = KVTransferServicer(self.registry, ctx.descriptor, lambda: self.kv_caches,
                                          on_sent=lambda n, b: stats.record_transfer("save", n, b, None),
                                          max_pin_s=float(ctx.option("kv_lease_s", 60.0)),
                                          mac_key=self._client.mac_key)
            self.server, port = start_kv_server(servicer, str(ctx.option("kv_host", "0.0.0.0")),
                                                int(ctx.option("kv_port", 0)), ctx.cluster_secret)
            self.address = f"{ctx.option('kv_advertise_host', '127.0.0.1')}:{port}"
            logger.info("KV server listening on port %d (announced as %s)", port, self.address)

    def bind_connector_metadata(self, meta: KVConnectorMetadata | None) -> None:
        super().bind_connector_metadata(meta)
        for spec in self._meta.serve:
            self.registry.add(spec.transfer_id, spec.blocks, spec.lease_s)

    def start_load_kv(self) -> None:
        # Releases name every rank's KV server of a transfer (comma-separated): tensor rank 0 sends them.
        for address, transfer_id in self._meta.releases if self.ctx.descriptor.tp_rank == 0 else ():
            if not self._closed:  # after shutdown the peer's lease frees the blocks
                self._loader.submit(self._client.release, address, transfer_id)
        if not self._meta.loads:
            return
        from pdserve.engine.kv_transfer import kv_layout

        fence = kv_layout.device_fence(self.kv_caches)  # after the steps already launched (asynchronous scheduling)
        for spec in self._meta.loads:
            with self._lock:
                self._inflight += 1
            t0 = time.perf_counter()
            if is_sharded(spec, self.ctx.descriptor.tp_size):
                # Tensor-parallel peers: pull this rank's heads from the shards that hold them (the stream only:
                # CUDA IPC copies whole blocks of one cache).
                if self.transport == "ipc":
                    self._pull_done(_PullJob.failed(spec, t0, "ipc_unavailable", "kv_transport ipc copies whole "
                                                    "blocks: it needs tensor_parallel_size 1 on both sides"))
                else:
                    self._stream(spec, t0, fence)
            elif self.transport != "stream" and self.kv_caches and self.kv_caches[0].is_cuda:
                self._loader.submit(self._load_via_ipc, spec, t0, fence)
            elif self.transport == "ipc":
                self._pull_done(_PullJob.failed(spec, t0, "ipc_unavailable", "kv_transport ipc needs a KV cache on "
                                                                              "a GPU"))
            else:
                self._stream(spec, t0, fence)

    def _stream(self, spec: LoadSpec, t0: float, fence: Any = None) -> None:
        # Several streams per transfer: one Python stream is bound by per-message work, not the network.
        n = max(1, min(self.streams, len(spec.blocks) // 8 or 1))
        size = -(-len(spec.blocks) // n)
        ranges = [spec.blocks[i:i + size] for i in range(0, len(spec.blocks), size)]
        try:
            pieces = self._pieces(spec)
        except ValueError as exc:  # a handle whose servers do not match its layout (it was signed: a bug)
            return self._pull_done(_PullJob.failed(spec, t0, "incompatible", str(exc)))
        job = _PullJob(spec, len(ranges) * len(pieces), t0)
        with self._lock:
            self.loads_by_transport["stream"] += 1
        for piece in pieces:
            for blocks in ranges:
                self._loader.submit(self._pull_range, job, blocks, piece, fence)

    def _pieces(self, spec: LoadSpec) -> list["_Source"]:
        """The KV servers (and heads of theirs) this rank's part of a load comes from (see head_shards)."""
        desc = self.ctx.descriptor
        addresses = spec.source["kv_server"].split(",")
        sender_tp = int(spec.source.get("sender_tp", 1))
        if not is_sharded(spec, desc.tp_size):
            return [_Source(addresses[0], desc, None)]
        if len(addresses) != sender_tp:
            raise ValueError(f"the transfer handle names {len(addresses)} KV servers for {sender_tp} ranks")
        out = []
        for p in load_plan(self.ctx.kv_heads, sender_tp, desc.tp_size, desc.tp_rank):
            shard = shard_descriptor(desc, self.ctx.kv_heads, sender_tp, p.sender_rank)
            out.append(_Source(addresses[p.sender_rank], shard, None if sender_tp == desc.tp_size else p))
        return out

    def _load_via_ipc(self, spec: LoadSpec, t0: float, fence: Any = None) -> None:
        """Copy a transfer's blocks device to device from a peer on this node (falls back to the stream under
        ``auto`` when the peer's cache cannot be mapped here)."""
        from pdserve.engine.kv_transfer.grpc import cuda_ipc

        address, transfer_id = spec.source["kv_server"], spec.source["transfer_id"]
        job = _PullJob(spec, 1, t0)
        failure = None
        try:
            peer = self._ipc_peer(address)
            if peer is None:
                if self.transport == "auto":
                    return self._stream(spec, t0, fence)
                failure = (0, "ipc_unavailable", f"cannot map the KV cache of {address} over CUDA IPC")
            else:
                cache_id, src_ids = self._client.locate(address, transfer_id, spec.blocks, self.timeout_s)
                if cache_id != peer.cache_id:  # the peer restarted since we mapped its cache
                    peer = self._ipc_peer(address, refresh=True)
                if peer is None or cache_id != peer.cache_id:
                    failure = (0, "peer_gone", f"the KV cache of {address} changed while being loaded")
                else:
                    if self._copy_stream is None:
                        self._copy_stream = torch.cuda.Stream(device=self.kv_caches[0].device)
                    cuda_ipc.copy_blocks(peer.caches, src_ids, self.kv_caches, [b.block_id for b in spec.blocks],
                                         self._copy_stream, after=fence)
                    job.add_bytes(sum(self.ctx.descriptor.payload_bytes(b.num_tokens) for b in spec.blocks))
                    with self._lock:
                        self.loads_by_transport["ipc"] += 1
        except PullError as exc:
            failure = (0, exc.reason, str(exc))
            if exc.reason == "peer_gone":
                with self._ipc_lock:
                    self._ipc_peers.pop(address, None)  # unmap a dead peer's cache; a restarted one is mapped anew
        except Exception as exc:  # never leave a request waiting on a load that died
            logger.exception("KV load of request %s over CUDA IPC failed", spec.request_id)
            failure = (0, "error", f"{type(exc).__name__}: {exc}")
        job.finish(failure)
        self._pull_done(job)

    def _ipc_peer(self, address: str, refresh: bool = False) -> "_IpcPeer | None":
        """The peer's cache mapped into this process (opened once per KV server), or None when IPC is impossible
        (another node, an invisible GPU, a CPU cache, this very process)."""
        from pdserve.engine.kv_transfer.grpc import cuda_ipc

        with self._ipc_lock:
            if address in self._ipc_peers and not refresh:
                self._ipc_peers.move_to_end(address)
                return self._ipc_peers[address]
            peer = None
            try:
                share = self._client.share_cache(address, cuda_ipc.node_id(), self.timeout_s)
                peer = _IpcPeer(share.cache_id, cuda_ipc.open_cache(share, self.kv_caches[0].dtype))
                logger.info("KV server %s shares its GPU cache: loading its blocks over CUDA IPC", address)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return None  # maybe transient: ask again next time (the stream will report the peer gone)
                logger.info("KV server %s: no CUDA IPC (%s); streaming its blocks", address, exc.details())
            except RuntimeError as exc:
                logger.info("KV server %s: no CUDA IPC (%s); streaming its blocks", address, exc)
            self._ipc_peers[address] = peer
            self._ipc_peers.move_to_end(address)
            while len(self._ipc_peers) > MAX_IPC_PEERS:
                self._ipc_peers.popitem(last=False)
            return peer

    def _pull_range(self, job: "_PullJob", blocks: tuple, source: "_Source", fence: Any = None) -> None:
        from pdserve.engine.kv_transfer import kv_layout

        address, transfer_id = source.address, job.spec.source["transfer_id"]
        heads = source.heads
        batch: list[tuple[BlockRef, Any]] = []
        written = 0

        def flush() -> None:
            nonlocal written
            if batch:
                kv_layout.wait_fence(fence, self.kv_caches)
                kv_layout.write_blocks(self.kv_caches, [r.block_id for r, _ in batch], [p for _, p in batch],
                                       None if heads is None else heads.dst_head)
                written += len(batch)
                batch.clear()

        def on_block(ref: BlockRef, payload: memoryview) -> None:
            arr = kv_layout.payload_array(payload, source.descriptor, ref.num_tokens)
            batch.append((ref, arr if heads is None else arr[:, :, :, heads.src_head:heads.src_head + heads.count]))
            if len(batch) >= 8:
                flush()

        failure = None
        try:
            nbytes = self._client.pull(address, transfer_id, blocks, self.timeout_s, on_block, source.descriptor)
            job.add_bytes(nbytes)
        except PullError as exc:
            failure = (blocks[0].index - job.spec.blocks[0].index + exc.num_valid_blocks, exc.reason, str(exc))
        except Exception as exc:  # never leave a request waiting on a load that died
            logger.exception("KV pull of request %s failed", job.spec.request_id)
            failure = (blocks[0].index - job.spec.blocks[0].index, "error", f"{type(exc).__name__}: {exc}")
        try:
            flush()
            kv_layout.synchronize(self.kv_caches)
        except Exception as exc:
            logger.exception("writing pulled KV failed")
            failure = failure or (blocks[0].index - job.spec.blocks[0].index, "error", str(exc))
        if job.finish(failure):
            self._pull_done(job)

    def _pull_done(self, job: "_PullJob") -> None:
        spec = job.spec
        address, transfer_id = spec.source["kv_server"], spec.source["transfer_id"]
        # Several ranks read a sharded transfer: the scheduler half releases it once all of them are done.
        sharded = is_sharded(spec, self.ctx.descriptor.tp_size)
        if job.failure is None:
            self.stats.record_transfer("load", len(spec.blocks), job.nbytes, time.perf_counter() - job.t0)
            nbytes = job.nbytes
            self._results.put(lambda out: out.loaded_bytes.__setitem__(spec.request_id, nbytes))
            # The blocks are in place: the request may run now; the acknowledgement's round trip follows.
            self._results.put(lambda out: out.finished_loading.add(spec.request_id))
            if not sharded and not self._closed:
                self._client.release(address, transfer_id)
        else:
            valid, reason, message = job.failure
            self.stats.record_failure(reason)
            if reason not in ("peer_gone", "lease_expired") and not sharded and not self._closed:
                self._client.release(address, transfer_id)  # let the peer free its blocks now
            failure = LoadFailure(reason, message, valid)
            self._results.put(lambda out: out.failed_loading.__setitem__(spec.request_id, failure))
        with self._lock:
            self._inflight -= 1

    def get_finished(self) -> KVConnectorOutput:
        out = KVConnectorOutput(released=self.registry.take_released(), expired=set(self.registry.expire()))
        return out.apply_all(self._results)

    def has_pending_work(self) -> bool:
        with self._lock:
            return self._inflight > 0

    def shutdown(self) -> None:
        self._closed = True
        if self.server is not None:
            self.server.stop(grace=1.0)
        # Closing the channels first cancels the pulls in flight: the loader threads end now, not at a deadline.
        self._client.close()
        self._loader.shutdown(wait=True, cancel_futures=True)
        with self._ipc_lock:
            self._ipc_peers.clear()  # unmap peers' caches
        self._client.close()  # channels a thread opened while ending (a release is skipped once closed)


def is_sharded(spec: LoadSpec, tp_size: int) -> bool:
    """Whether a load involves tensor-parallel ranks on either side (then every rank pulls its heads)."""
    return tp_size > 1 or int(spec.source.get("sender_tp", 1)) > 1


@dataclass(frozen=True)
class _Source:
    """A KV server a rank pulls from, the descriptor of its shard, and (another layout) which heads go where."""

    address: str
    descriptor: KVDescriptor
    heads: ShardPiece | None


@dataclass(frozen=True)
class _IpcPeer:
    cache_id: str
    caches: list  # the peer's per-layer cache tensors, mapped into this process


class _PullJob:
    """One transfer pulled over several streams; the earliest failure decides how many blocks count."""

    def __init__(self, spec: LoadSpec, num_ranges: int, t0: float) -> None:
        self.spec, self.t0 = spec, t0
        self.nbytes = 0
        self.failure: tuple[int, str, str] | None = None
        self._left = num_ranges
        self._lock = threading.Lock()

    @classmethod
    def failed(cls, spec: LoadSpec, t0: float, reason: str, message: str) -> "_PullJob":
        job = cls(spec, 1, t0)
        job.finish((0, reason, message))
        return job

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.nbytes += n

    def finish(self, failure: tuple[int, str, str] | None) -> bool:
        """Record a range's outcome; True for the last one."""
        with self._lock:
            if failure is not None and (self.failure is None or failure[0] < self.failure[0]):
                self.failure = failure
            self._left -= 1
            return self._left == 0
