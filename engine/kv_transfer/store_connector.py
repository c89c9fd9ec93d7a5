"""Connectors over a :class:`BlockStore` (``shared-fs``, ``redis``): save layer by layer, load asynchronously.

Saving (producer): for every block a step completes, ``save_kv_layer`` copies that layer's slice into a host
staging tensor right after the layer wrote it (on a GPU: an asynchronous device-to-host copy that overlaps the next
layer's compute). ``wait_for_save`` hands the staged blocks to a writer thread that encodes them (header +
CRC-32) and puts them in the store while the engine goes on; the finished request's blocks are held until then.

Loading (consumer): the scheduler half found the blocks in the store; a loader thread fetches, validates and
copies them into the request's blocks while other requests keep running, then ``get_finished`` reports it. A block
that is missing, corrupt or incompatible ends the load there: the blocks before it count, the rest is recomputed
(or the request fails, by policy).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from pdserve.engine.kv_transfer.base import (KVConnectorContext, KVConnectorOutput, KVConnectorWorker,
                                             KVTransferParams, LoadFailure, LoadSpec, SaveSpec)
from pdserve.engine.kv_transfer.block_format import KVFormatError, decode_block, encode_block
from pdserve.engine.kv_transfer.connector_scheduler import BlockConnectorScheduler
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.kv_transfer.prompt_blocks import PromptBlock
from pdserve.engine.kv_transfer.store import BlockStore, StoreUnavailableError, block_key

logger = logging.getLogger(__name__)

# Blocks fetched per store round trip while loading: bounds host memory and overlaps fetching with copying.
_LOAD_BATCH = 16


class StoreConnectorScheduler(BlockConnectorScheduler):
    """Finds a request's prompt blocks in the store (a handle is optional: any stored prefix is reused)."""

    def __init__(self, ctx: KVConnectorContext, name: str, stats: KVTransferStats, store: BlockStore) -> None:
        super().__init__(ctx, name, stats)
        self.store = store

    def _lookup(self, request: Any, handle: KVTransferParams | None, wanted: list[PromptBlock]
                ) -> tuple[int, dict[str, Any]]:
        return self.store.count_prefix([block_key(b.block_hash) for b in wanted]), {}

    def _contains(self, hashes: list[int]) -> list[bool]:
        return self.store.contains([block_key(h) for h in hashes])


class StoreConnectorWorker(KVConnectorWorker):
    """Moves blocks between the KV cache and a store with one writer thread and a few loader threads."""

    def __init__(self, ctx: KVConnectorContext, stats: KVTransferStats, store: BlockStore) -> None:
        super().__init__(ctx)
        self.store = store
        self.stats = stats
        self.desc = ctx.descriptor
        self._loader = ThreadPoolExecutor(max_workers=int(ctx.option("kv_load_threads", 2)),
                                          thread_name_prefix="kv-load")
        # One writer keeps a step's writes in order and bounds the host memory held by staged blocks.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-save")
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
        for spec in self._meta.loads:
            self._track(+1)
            self._loader.submit(self._load, spec, time.perf_counter())

    def _load(self, spec: LoadSpec, t0: float) -> None:
        from pdserve.engine.kv_transfer import kv_layout

        done, nbytes = 0, 0
        try:
            blocks = spec.blocks
            for start in range(0, len(blocks), _LOAD_BATCH):
                batch = blocks[start:start + _LOAD_BATCH]
                blobs = self.store.get_many([block_key(b.block_hash) for b in batch])
                for ref, blob in zip(batch, blobs):
                    if blob is None:
                        raise _Missing(f"KV block {block_key(ref.block_hash)} is not in the {self.store.name} "
                                       f"store (evicted or never written)")
                    header, payload = decode_block(blob, self.desc, ref.block_hash, ref.num_tokens)
                    kv_layout.write_block(self.kv_caches, ref.block_id, kv_layout.payload_array(
                        payload, self.desc, header.num_tokens))
                    done += 1
                    nbytes += header.payload_bytes
            kv_layout.synchronize(self.kv_caches)
            self.stats.record_transfer("load", done, nbytes, time.perf_counter() - t0)
            self._results.put(lambda out: out.finished_loading.add(spec.request_id))
        except (KVFormatError, StoreUnavailableError, _Missing) as exc:
            self._load_failed(spec, exc.reason, str(exc), done, nbytes)
        except Exception as exc:  # a bug or a device error: still report, never leave the request waiting
            logger.exception("KV load of request %s failed", spec.request_id)
            self._load_failed(spec, "error", f"{type(exc).__name__}: {exc}", done, nbytes)
        finally:
            self._track(-1)

    def _load_failed(self, spec: LoadSpec, reason: str, message: str, done: int, nbytes: int) -> None:
        from pdserve.engine.kv_transfer import kv_layout

        kv_layout.synchronize(self.kv_caches)  # the valid blocks must be in place before they are used
        self.stats.record_failure(reason)
        if done:
            self.stats.record_transfer("load", done, nbytes, None)
        failure = LoadFailure(reason, message, done)
        self._results.put(lambda out: out.failed_loading.__setitem__(spec.request_id, failure))

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
        self._track(+1)
        self._writer.submit(self._write, stage, saves, event, t0)

    def _begin_stage(self, saves: list[SaveSpec]) -> None:
        import torch

        from pdserve.engine.kv_transfer import kv_layout

        ids = [ref.block_id for spec in saves for ref in spec.blocks]
        self._save_ids = torch.tensor(ids, dtype=torch.long, device=self.kv_caches[0].device)
        self._stage = kv_layout.new_stage(len(ids), self.kv_caches)
        self._save_t0 = time.perf_counter()

    def _write(self, stage: Any, saves: list[SaveSpec], event: Any, t0: float) -> None:
        reported = 0
        try:
            if event is not None:
                event.synchronize()
            row = 0
            for spec in saves:
                self._write_spec(stage, row, spec, t0)
                row += len(spec.blocks)
                self._report_saved(spec.request_id)
                reported += 1
        except Exception:
            logger.exception("KV save failed")
            self.stats.record_failure("error")
        finally:
            for spec in saves[reported:]:  # release the holds all the same
                self._report_saved(spec.request_id)
            self._track(-1)

    def _write_spec(self, stage: Any, row: int, spec: SaveSpec, t0: float) -> None:
        from pdserve.engine.kv_transfer import kv_layout

        nblocks, nbytes = 0, 0
        for j, ref in enumerate(spec.blocks):
            payload = kv_layout.payload_from_stage(stage, row + j, ref.num_tokens)
            try:
                self.store.put(block_key(ref.block_hash),
                               encode_block(self.desc, ref.block_hash, ref.num_tokens, payload))
            except StoreUnavailableError as exc:
                # Decode pods will miss and recompute; saving the request's other blocks is pointless.
                logger.warning("saving KV of request %s failed: %s", spec.request_id, exc)
                self.stats.record_failure(exc.reason)
                break
            nblocks += 1
            nbytes += len(payload)
        self.stats.record_transfer("save", nblocks, nbytes, time.perf_counter() - t0)

    def _report_saved(self, rid: str) -> None:
        self._results.put(lambda out: out.finished_saving.__setitem__(rid, out.finished_saving.get(rid, 0) + 1))

    # ------------------------------------------------------------------ reporting
    def get_finished(self) -> KVConnectorOutput:
        out = KVConnectorOutput()
        while True:
            try:
                self._results.get_nowait()(out)
            except queue.Empty:
                return out

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
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        self.store.close()

    def _track(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta


class _Missing(Exception):
    reason = "missing"
