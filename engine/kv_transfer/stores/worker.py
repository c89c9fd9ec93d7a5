"""The worker half of the connectors over a :class:`BlockStore` (``shared-fs``, ``redis``): save layer by layer,
load asynchronously.

Saving (producer): for every block a step completes, ``save_kv_layer`` copies that layer's slice into a host
staging tensor right after the layer wrote it (on a GPU: an asynchronous device-to-host copy that overlaps the next
layer's compute). ``wait_for_save`` hands the staged blocks to the I/O threads, which checksum them and put them
in the store while the engine goes on; the finished request's blocks are held until then.

Loading (consumer): the scheduler half found the blocks in the store; the I/O threads fetch, validate and copy
them into the request's blocks while other requests keep running, then ``get_finished`` reports it. A block
that is missing, corrupt or incompatible ends the load there: the blocks before it count, the rest is recomputed
(or the request fails, by policy).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from pdserve.engine.kv_transfer.base import (KVConnectorContext, KVConnectorOutput, KVConnectorWorker, LoadFailure,
                                             LoadSpec, SaveSpec)
from pdserve.engine.kv_transfer.block_format import KVDescriptor, KVFormatError, decode_block, encode_block_parts
from pdserve.engine.kv_transfer.head_shards import ShardPiece, load_plan, shard_descriptor
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.kv_transfer.stores.store import BlockStore, ShardStores, StoreUnavailableError, block_key

logger = logging.getLogger(__name__)

# Blocks per I/O task: one store round trip and one batched copy into the cache per group when loading.
_GROUP = 8


class StoreConnectorWorker(KVConnectorWorker):
    """Moves blocks between the KV cache and a store with a pool of I/O threads.

    A transfer is split into groups of blocks that the threads handle in parallel (checksums, file and socket
    I/O and numpy copies release the GIL); a load or a save is reported once all of its groups are done.
    """

    saves_unreported_layers = True  # wait_for_save stages the layers no hook reported

    def __init__(self, ctx: KVConnectorContext, stats: KVTransferStats, store: BlockStore,
                 open_namespace: Callable[[str], BlockStore] | None = None) -> None:
        super().__init__(ctx)
        self.store = store
        self.shards = ShardStores(store, ctx.descriptor.namespace, open_namespace)
        self.stats = stats
        self.desc = ctx.descriptor
        # Every block written carries a MAC under this key and every block read must carry a valid one.
        self.mac_key = ctx.cluster_secret.derive("kv-block") if ctx.cluster_secret is not None else None
        threads = int(ctx.option("kv_io_threads", min(8, os.cpu_count() or 1)))
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kv-io")
        self._results: queue.SimpleQueue[Callable[[KVConnectorOutput], None]] = queue.SimpleQueue()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._saves: list[SaveSpec] = []
        self._stage: Any = None
        self._staged_layers: set[int] = set()
        self._save_ids: Any = None
        self._save_t0 = 0.0

    # ------------------------------------------------------------------ loading
    def start_load_kv(self) -> None:
        if not self._meta.loads:
            return
        from pdserve.engine.kv_transfer import kv_layout

        fence = kv_layout.device_fence(self.kv_caches)  # after the steps already launched (asynchronous scheduling)
        for spec in self._meta.loads:
            pieces = self._pieces(spec)
            starts = range(0, len(spec.blocks), _GROUP)
            job = _Job(len(starts) * len(pieces), self._load_done, spec, time.perf_counter())
            self._track(+1)
            for piece in pieces:
                for start in starts:
                    self._pool.submit(self._load_group, job, start, spec.blocks[start:start + _GROUP], piece,
                                      fence)

    def _pieces(self, spec: LoadSpec) -> list["_Piece"]:
        """Where this rank's heads of the load are: its own layout's shard, or a peer layout's shards."""
        desc = self.desc
        sender_tp = int(spec.source.get("sender_tp", desc.tp_size))
        out = []
        for p in load_plan(self.ctx.kv_heads, sender_tp, desc.tp_size, desc.tp_rank):
            shard = shard_descriptor(desc, self.ctx.kv_heads, sender_tp, p.sender_rank)
            whole = sender_tp == desc.tp_size
            out.append(_Piece(shard, self.shards.get(shard.namespace), None if whole else p))
        return out

    def _load_group(self, job: "_Job", start: int, group: tuple, piece: "_Piece", fence: Any = None) -> None:
        from pdserve.engine.kv_transfer import kv_layout

        ids, payloads, failure = [], [], None
        heads = piece.heads
        try:
            blobs = piece.store.get_many([block_key(b.block_hash) for b in group])
            for i, (ref, blob) in enumerate(zip(group, blobs)):
                if blob is None:
                    failure = _Failure(start + i, "missing", f"KV block {block_key(ref.block_hash)} is not in the "
                                                             f"{self.store.name} store (evicted or never written)")
                    break
                try:
                    header, payload = decode_block(blob, piece.descriptor, ref.block_hash, ref.num_tokens,
                                                   self.mac_key)
                except KVFormatError as exc:
                    failure = _Failure(start + i, exc.reason, str(exc))
                    break
                ids.append(ref.block_id)
                arr = kv_layout.payload_array(payload, piece.descriptor, header.num_tokens)
                payloads.append(arr if heads is None else arr[:, :, :, heads.src_head:heads.src_head + heads.count])
                job.add_bytes(header.payload_bytes)
        except StoreUnavailableError as exc:
            failure = _Failure(start, exc.reason, str(exc))
        try:
            # The blocks before a bad one are valid: copy them in, the failure says they count.
            if ids:
                kv_layout.wait_fence(fence, self.kv_caches)
                kv_layout.write_blocks(self.kv_caches, ids, payloads, None if heads is None else heads.dst_head)
                kv_layout.synchronize(self.kv_caches)
        except Exception as exc:  # a bug or a device error: still report, never leave the request waiting
            logger.exception("KV load group failed")
            failure = _Failure(start, "error", f"{type(exc).__name__}: {exc}")
        job.finish(failure)

    def _load_done(self, job: "_Job") -> None:
        spec: LoadSpec = job.spec
        failure = job.first_failure
        if failure is None:
            self.stats.record_transfer("load", len(spec.blocks), job.nbytes, time.perf_counter() - job.t0)
            nbytes = job.nbytes
            self._results.put(lambda out: out.loaded_bytes.__setitem__(spec.request_id, nbytes))
            self._results.put(lambda out: out.finished_loading.add(spec.request_id))
        else:
            # Blocks before the first failing one all loaded (a group either finished or failed at or after it).
            self.stats.record_failure(failure.reason)
            lost = LoadFailure(failure.reason, failure.message, failure.index)
            self._results.put(lambda out: out.failed_loading.__setitem__(spec.request_id, lost))
        self._track(-1)

    # ------------------------------------------------------------------ saving
    def bind_connector_metadata(self, meta: Any) -> None:
        super().bind_connector_metadata(meta)
        self._saves = list(self._meta.saves)  # consumed by wait_for_save: a step saves once

    def save_kv_layer(self, layer_idx: int, kv_layer: Any) -> None:
        if not self._saves:
            return
        from pdserve.engine.kv_transfer import kv_layout

        if self._stage is None:
            self._begin_stage(self._saves)
        kv_layout.stage_layer(self._stage, layer_idx, kv_layer, self._save_ids)
        self._staged_layers.add(layer_idx)

    def wait_for_save(self) -> None:
        saves, self._saves = self._saves, []
        if not saves:
            return
        from pdserve.engine.kv_transfer import kv_layout

        if self._stage is None:
            self._begin_stage(saves)
        for layer_idx, kv_layer in enumerate(self.kv_caches):  # layers the forward pass did not report
            if layer_idx not in self._staged_layers:
                kv_layout.stage_layer(self._stage, layer_idx, kv_layer, self._save_ids)
        event = None
        if self.kv_caches[0].is_cuda:
            import torch

            event = torch.cuda.Event()
            event.record()
        stage, t0 = self._stage, self._save_t0
        self._stage, self._staged_layers, self._save_ids = None, set(), None
        row = 0
        for spec in saves:
            groups = range(0, len(spec.blocks), _GROUP)
            job = _Job(len(groups), self._save_done, spec, t0)
            self._track(+1)
            for start in groups:
                self._pool.submit(self._save_group, job, stage, row + start, spec.blocks[start:start + _GROUP],
                                  event)
            row += len(spec.blocks)

    def _begin_stage(self, saves: list[SaveSpec]) -> None:
        import torch
        from pdserve.engine.kv_transfer import kv_layout

        ids = [ref.block_id for spec in saves for ref in spec.blocks]
        self._save_ids = torch.tensor(ids, dtype=torch.long, device=self.kv_caches[0].device)
        self._stage = kv_layout.new_stage(len(ids), self.kv_caches)
        self._save_t0 = time.perf_counter()

    def _save_group(self, job: "_Job", stage: Any, row: int, group: tuple, event: Any) -> None:
        from pdserve.engine.kv_transfer import kv_layout

        try:
            if event is not None:
                event.synchronize()  # the step's device-to-host copies have landed
            for j, ref in enumerate(group):
                parts = kv_layout.stage_segments(stage, row + j, ref.num_tokens)
                self.store.put(block_key(ref.block_hash),
                               encode_block_parts(self.desc, ref.block_hash, ref.num_tokens, parts,
                                                  self.mac_key))
                job.add_bytes(self.desc.payload_bytes(ref.num_tokens))
            job.finish()
        except StoreUnavailableError as exc:
            # Decode pods will miss and recompute: the request still completes, its blocks are released.
            job.finish(_Failure(0, exc.reason, str(exc)))
        except Exception as exc:
            logger.exception("KV save group failed")
            job.finish(_Failure(0, "error", f"{type(exc).__name__}: {exc}"))

    def _save_done(self, job: "_Job") -> None:
        spec: SaveSpec = job.spec
        if job.first_failure is not None:
            logger.warning("saving the KV of request %s failed: %s", spec.request_id, job.first_failure.message)
            self.stats.record_failure(job.first_failure.reason)
        self.stats.record_transfer("save", job.nblocks, job.nbytes, time.perf_counter() - job.t0)
        rid = spec.request_id
        self._results.put(lambda out: out.finished_saving.__setitem__(rid, out.finished_saving.get(rid, 0) + 1))
        self._track(-1)

    # ------------------------------------------------------------------ reporting
    def get_finished(self) -> KVConnectorOutput:
        return KVConnectorOutput().apply_all(self._results)

    def has_pending_work(self) -> bool:
        with self._inflight_lock:
            return self._inflight > 0

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Block until every load and save started so far has finished (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self.has_pending_work():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.shards.close()

    def _track(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta


@dataclass(frozen=True)
class _Piece:
    """One shard a load reads: its descriptor and store, and (another layout) which of its heads go where."""

    descriptor: KVDescriptor
    store: BlockStore
    heads: ShardPiece | None  # None: the shard is this rank's own layout, copied whole


class _Failure(Exception):
    """A group that stopped at block ``index`` of its transfer."""

    def __init__(self, index: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.index, self.reason, self.message = index, reason, message


class _Job:
    """One load or save split into groups; calls ``on_done(job)`` once, when the last group finishes."""

    def __init__(self, num_groups: int, on_done: Callable[["_Job"], None], spec: Any, t0: float) -> None:
        self.spec, self.t0 = spec, t0
        self.nbytes = self.nblocks = 0
        self.first_failure: _Failure | None = None
        self._left = num_groups
        self._on_done = on_done
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        """One more block of ``n`` payload bytes done."""
        with self._lock:
            self.nbytes += n
            self.nblocks += 1

    def finish(self, failure: _Failure | None = None) -> None:
        with self._lock:
            if failure is not None and (self.first_failure is None or failure.index < self.first_failure.index):
                self.first_failure = failure
            self._left -= 1
            last = self._left == 0
        if last:
            self._on_done(self)
