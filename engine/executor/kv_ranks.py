"""KV connectors with tensor parallelism: a worker half in every rank, the scheduler half in the engine core.

Each rank's KV cache holds its own KV heads, so each rank runs the connector's worker half on its own cache: it
saves its heads under its own shard's descriptor (``tp_rank``/``tp_size``), serves them from its own KV server
(grpc), and loads the heads it needs from whatever tensor-parallel layout the producer had
(:mod:`pdserve.engine.kv_transfer.head_shards`). No rank ever holds another rank's heads or weights.

The engine core keeps the scheduler half. The step's connector metadata reaches the ranks inside the scheduler
output they all read; what the ranks finished comes back through :meth:`MultiProcExecutor.poll_kv` (each rank's
:class:`KVConnectorOutput`, gathered over the CPU process group) and :class:`RankOutputMerger` reports a load,
save or release only once *every* rank did it::

    core: scheduler half ──meta in SchedulerOutput──▶ rank 0..R-1: worker half on its own heads
          ParallelKVConnector.get_finished() ──poll──▶ each rank's get_finished() ──gather──▶ merged here

Pipeline parallelism with a connector is refused (a stage holds only some layers; see engine/config.py).
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from pdserve.engine.kv_transfer.base import (KVConnectorContext, KVConnectorMetadata, KVConnectorOutput,
                                             KVConnectorScheduler, KVConnectorWorker, LoadFailure)
from pdserve.engine.kv_transfer.block_format import KVDescriptor
from pdserve.engine.kv_transfer.metrics import KVTransferStats


def connector_context(config: Any, descriptor: KVDescriptor, engine_id: str) -> KVConnectorContext:
    """The connector context of one rank (or of the core's scheduler half: rank 0's descriptor).

    A fixed ``kv_port`` is rank 0's: rank ``r``'s KV server (grpc) listens on ``kv_port + r``."""
    kvt, hf = config.kv_transfer, config.model.hf_config
    options = dict(kvt.options)
    if int(options.get("kv_port") or 0) > 0:
        options["kv_port"] = int(options["kv_port"]) + descriptor.tp_rank
    return KVConnectorContext(role=kvt.role, descriptor=descriptor, engine_id=engine_id, options=options,
                              hash_seed=config.cache.hash_seed, cluster_secret=kvt.cluster_secret,
                              redis_password=kvt.redis_password,
                              total_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)


def build_rank_connector(config: Any, kv_caches: list[Any], tp_rank: int, tp_size: int,
                         engine_id: str) -> KVConnectorWorker:
    """The worker half of one rank, on its own cache (called in the worker process)."""
    from pdserve.engine.core.block_hash import seed_id
    from pdserve.engine.kv_transfer.kv_layout import descriptor_for, model_fingerprint
    from pdserve.engine.kv_transfer.registry import create_connector

    model, cache = config.model, config.cache
    descriptor = descriptor_for(kv_caches, model_fingerprint=model_fingerprint(model.hf_config, model.model,
                                                                               model.load_format, model.seed),
                                hash_algo=cache.hash_algo, hash_seed_id=seed_id(cache.hash_seed), tp_rank=tp_rank,
                                tp_size=tp_size)
    _, worker = create_connector(config.kv_transfer.connector, connector_context(config, descriptor, engine_id))
    worker.register_kv_caches(kv_caches)
    return worker


@dataclass(frozen=True)
class RankKVInfo:
    """What a rank tells the core about its connector at start-up."""

    descriptor: dict[str, Any]
    kv_server: str | None  # grpc: this rank's KV server as peers reach it


@dataclass(frozen=True)
class RankKVReport:
    """A rank's answer to a poll: what its worker half finished, and its cumulative counters (as a dict)."""

    output: KVConnectorOutput
    stats: dict[str, Any] | None


def rank_info(worker: KVConnectorWorker) -> RankKVInfo:
    return RankKVInfo(worker.ctx.descriptor.to_dict(), getattr(worker, "address", None))


def rank_report(worker: KVConnectorWorker, meta: KVConnectorMetadata | None) -> RankKVReport:
    """Run in every rank on a poll: start what ``meta`` asks (an idle step's loads), then report."""
    if meta is not None:
        worker.bind_connector_metadata(meta)
        worker.start_load_kv()
    stats = getattr(worker, "stats", None)
    return RankKVReport(worker.get_finished(), stats.to_dict() if stats is not None else None)


class RankOutputMerger:
    """Merges the ranks' outputs: a load finished when every rank loaded its heads (failed if any rank failed:
    the blocks every rank loaded count), a save when every rank wrote its shard, a transfer released or expired
    when every rank's KV server let it go."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self._loads: dict[str, dict[int, LoadFailure | None]] = {}
        self._load_bytes: Counter[str] = Counter()
        self._saves: dict[str, list[int]] = {}  # request id -> per-rank saves not yet reported
        self._ended: dict[str, dict[int, bool]] = {}  # transfer id -> rank -> expired (False: released)

    def merge(self, outputs: list[KVConnectorOutput]) -> KVConnectorOutput:
        merged = KVConnectorOutput()
        for rank, out in enumerate(outputs):
            for rid in out.finished_loading:
                self._loads.setdefault(rid, {})[rank] = None
            for rid, failure in out.failed_loading.items():
                self._loads.setdefault(rid, {})[rank] = failure
            self._load_bytes.update(out.loaded_bytes)
            for rid, n in out.finished_saving.items():
                self._saves.setdefault(rid, [0] * self.num_ranks)[rank] += n
            for tid in out.released:
                self._ended.setdefault(tid, {})[rank] = False
            for tid in out.expired:
                self._ended.setdefault(tid, {})[rank] = True
        for rid in [r for r, by_rank in self._loads.items() if len(by_rank) == self.num_ranks]:
            failures = [f for f in self._loads.pop(rid).values() if f is not None]
            nbytes = self._load_bytes.pop(rid, 0)
            if failures:
                merged.failed_loading[rid] = min(failures, key=lambda f: f.num_valid_blocks)
            else:
                merged.finished_loading.add(rid)
                merged.loaded_bytes[rid] = nbytes
        for rid, pending in list(self._saves.items()):
            done = min(pending)
            if done:
                merged.finished_saving[rid] = done
                self._saves[rid] = pending = [n - done for n in pending]
            if not any(pending):
                del self._saves[rid]
        for tid in [t for t, by_rank in self._ended.items() if len(by_rank) == self.num_ranks]:
            (merged.expired if any(self._ended.pop(tid).values()) else merged.released).add(tid)
        return merged


@dataclass
class ParallelKVStats(KVTransferStats):
    """The scheduler half's counters with the ranks' worker counters added: bytes of every rank (each moves its
    own heads); blocks, latencies and failures of tensor rank 0 (every rank moves the same blocks)."""

    ranks: list[KVTransferStats] = field(default_factory=list, repr=False)

    def snapshot(self) -> KVTransferStats:
        own = super().snapshot()
        if not self.ranks:
            return own
        first = self.ranks[0]
        for d in own.bytes:
            own.bytes[d] += sum(r.bytes.get(d, 0) for r in self.ranks)
            own.blocks[d] += first.blocks.get(d, 0)
            own.latency_buckets[d] = [a + b for a, b in zip(own.latency_buckets[d], first.latency_buckets[d])]
            own.latency_sum[d] += first.latency_sum.get(d, 0.0)
        for reason, n in first.failures.items():
            own.failures[reason] = own.failures.get(reason, 0) + n
        return own


class ParallelKVConnector(KVConnectorWorker):
    """The core's stand-in for the ranks' worker halves (what the engine core calls on its connector)."""

    def __init__(self, ctx: KVConnectorContext, poll: Callable[[KVConnectorMetadata | None], list[RankKVReport]],
                 stats: ParallelKVStats, num_ranks: int, has_pending: Callable[[], bool]) -> None:
        super().__init__(ctx)
        self._poll = poll
        # The scheduler half tracks every load, save and held transfer the ranks can report on: while it has
        # none, a poll would come back empty, so steps without transfers skip the round trip.
        self._has_pending = has_pending
        self._stats = stats
        self._merger = RankOutputMerger(num_ranks)
        self._to_start: KVConnectorMetadata | None = None

    def start_load_kv(self) -> None:
        """An idle step's metadata (no forward pass carries it): the ranks get it with the next poll."""
        if not self._meta.is_empty:
            self._to_start = self._meta

    def get_finished(self) -> KVConnectorOutput:
        meta, self._to_start = self._to_start, None
        if meta is None and not self._has_pending():
            return KVConnectorOutput()
        reports = self._poll(meta)
        self._stats.ranks = [KVTransferStats.from_dict(r.stats) for r in reports if r.stats is not None]
        return self._merger.merge([r.output for r in reports])


def build_parallel_connector(config: Any, infos: list[RankKVInfo],
                             poll: Callable[[KVConnectorMetadata | None], list[RankKVReport]]
                             ) -> tuple[KVConnectorScheduler, ParallelKVConnector]:
    """The core's scheduler half (described by rank 0's cache, naming every rank's KV server) and the stand-in
    for the ranks' worker halves."""
    from pdserve.engine.kv_transfer.registry import create_scheduler_half

    descriptor = KVDescriptor.from_dict(infos[0].descriptor)
    ctx = connector_context(config, descriptor, uuid.uuid4().hex[:12])
    stats = ParallelKVStats(connector=config.kv_transfer.connector)  # exported: the scheduler's plus the ranks'
    sched = create_scheduler_half(config.kv_transfer.connector, ctx, [i.kv_server for i in infos], stats)
    return sched, ParallelKVConnector(ctx, poll, stats, len(infos), sched.has_pending_work)
