"""Tensor-parallel KV layouts: which heads a rank holds, where a rank of another TP size finds them, and every
connector moving a prompt's KV between engines of different TP sizes on real cache tensors (no model, no
processes: each rank's worker half on its own slice of one cache, the scheduler half of rank 0, as in an engine).
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch

from kv_harness import Side, admit, make_request, prefill, step, wait_for

from pdserve.engine.executor.kv_ranks import RankOutputMerger
from pdserve.engine.kv_transfer.base import KVConnectorContext, KVConnectorOutput, KVConnectorWorker, LoadFailure
from pdserve.engine.kv_transfer.block_format import IncompatibleDescriptorError, KVDescriptor
from pdserve.engine.kv_transfer.head_shards import (ShardPiece, check_shard_compatible, kv_head_range, load_plan,
                                                    senders_needed, shard_descriptor)
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.kv_transfer.registry import create_connector, create_scheduler_half
from pdserve.engine.models.parallel_layers import ModelShard, qkv_parallel_linear
from pdserve.engine.security import load_cluster_secret

HEADS = 2  # KV heads of the test cache: TP=4 replicates each on two ranks


@pytest.mark.parametrize(("heads", "tp"), [(3, 1), (3, 3), (2, 2), (2, 4), (8, 4)])
def test_head_ranges_are_the_model_layers_cut(heads, tp):
    """Rank r's KV heads are those its qkv_proj computes (the cache holds what the layer writes)."""
    for rank in range(tp):
        layer = qkv_parallel_linear(16, 4, 12, heads, False,
                                    ModelShard(tp_rank=rank, tp_size=tp))
        first, count = kv_head_range(heads, tp, rank)
        if tp == 1:
            assert (first, count) == (0, heads)
            continue
        assert layer.weight.weight_loader.args[1]["k"] == (first * 4, count * 4)  # (start, width) of k rows


def test_load_plans():
    assert load_plan(3, 1, 3, 1) == [ShardPiece(0, 1, 0, 1)]  # TP=1 -> 3: head 1 of the one shard
    assert load_plan(3, 3, 1, 0) == [ShardPiece(0, 0, 0, 1), ShardPiece(1, 0, 1, 1), ShardPiece(2, 0, 2, 1)]
    assert load_plan(4, 2, 1, 0) == [ShardPiece(0, 0, 0, 2), ShardPiece(1, 0, 2, 2)]  # runs of heads stay whole
    assert load_plan(2, 4, 1, 0) == [ShardPiece(0, 0, 0, 1), ShardPiece(2, 0, 1, 1)]  # first replica of each
    assert load_plan(2, 1, 4, 3) == [ShardPiece(0, 1, 0, 1)]
    assert load_plan(2, 4, 4, 2) == [ShardPiece(2, 0, 0, 1)]  # same layout: the own rank's shard, whole
    assert senders_needed(2, 4, 1) == [0, 2] and senders_needed(2, 4, 4) == [0, 1, 2, 3]


def test_shards_of_one_model_are_compatible_other_formats_are_not(descriptor):
    ours = shard_descriptor(descriptor, 2, 2, 1)
    check_shard_compatible(ours, descriptor, 2)  # TP=1 of the same model
    check_shard_compatible(ours, shard_descriptor(descriptor, 2, 4, 3), 2)
    for change, field in ((dict(block_size=8), "block_size"), (dict(dtype="bfloat16"), "dtype"),
                          (dict(model_fingerprint="other"), "model_fingerprint")):
        with pytest.raises(IncompatibleDescriptorError, match=field):
            check_shard_compatible(ours, dataclasses.replace(descriptor, **change), 2)
    with pytest.raises(IncompatibleDescriptorError, match="num_kv_heads"):  # 2 heads per rank at TP=2: not 2 heads
        check_shard_compatible(ours, dataclasses.replace(descriptor, tp_size=2), 2)


def test_merger_reports_what_every_rank_did():
    merger = RankOutputMerger(2)
    out = merger.merge([KVConnectorOutput(finished_loading={"a"}, finished_saving={"s": 2}, released={"t"}),
                        KVConnectorOutput(finished_saving={"s": 1})])
    assert not out.finished_loading and out.finished_saving == {"s": 1} and not out.released
    lost = LoadFailure("missing", "gone", 1)
    out = merger.merge([KVConnectorOutput(failed_loading={"b": LoadFailure("checksum", "bad", 2)}),
                        KVConnectorOutput(finished_loading={"a"}, failed_loading={"b": lost},
                                          finished_saving={"s": 1}, expired={"t"})])
    assert out.finished_loading == {"a"} and out.failed_loading == {"b": lost}  # the fewest valid blocks
    assert out.finished_saving == {"s": 1} and out.expired == {"t"} and not out.released


# ---------------------------------------------------------------------------------------------- connectors
class _Ranks(KVConnectorWorker):
    """An engine's ranks as one worker half (what the executor does across processes): each rank's worker half
    on its own cache, outputs merged."""

    def __init__(self, workers: list[KVConnectorWorker], caches: list[list[torch.Tensor]]) -> None:
        super().__init__(workers[0].ctx)
        self.workers, self.rank_caches = workers, caches
        self.merger = RankOutputMerger(len(workers))

    def bind_connector_metadata(self, meta):
        for w in self.workers:
            w.bind_connector_metadata(meta)

    def start_load_kv(self):
        for w in self.workers:
            w.start_load_kv()

    def save_kv_layer(self, layer_idx, kv_layer):
        for w, caches in zip(self.workers, self.rank_caches):
            w.save_kv_layer(layer_idx, caches[layer_idx])

    def wait_for_save(self):
        for w in self.workers:
            w.wait_for_save()

    def get_finished(self):
        return self.merger.merge([w.get_finished() for w in self.workers])

    def has_pending_work(self):
        return any(w.has_pending_work() for w in self.workers)

    def shutdown(self):
        for w in self.workers:
            w.shutdown()


def _engine(connector: str, role: str, desc: KVDescriptor, tp: int, full: list[torch.Tensor], options) -> Side:
    """An engine of ``tp`` ranks whose caches are the head slices of ``full`` (one tensor per layer)."""
    workers, caches = [], []
    for rank in range(tp):
        shard = shard_descriptor(desc, HEADS, tp, rank)
        ctx = KVConnectorContext(role=role, descriptor=shard, engine_id=f"{role}{rank}", options=options,
                                 cluster_secret=load_cluster_secret(), total_kv_heads=HEADS)
        first, count = kv_head_range(HEADS, tp, rank)
        rank_caches = [layer[:, :, :, first:first + count].clone() for layer in full]
        worker = create_connector(connector, ctx)[1]
        worker.register_kv_caches(rank_caches)
        workers.append(worker)
        caches.append(rank_caches)
    ctx0 = dataclasses.replace(workers[0].ctx, engine_id=role)
    sched = create_scheduler_half(connector, ctx0, [getattr(w, "address", None) for w in workers],
                                  KVTransferStats(connector=connector))
    return Side(sched, _Ranks(workers, caches), caches[0], KVConnectorOutput(), [])


def _full(desc: KVDescriptor, num_blocks: int, fill) -> list[torch.Tensor]:
    shape = (2, num_blocks, desc.block_size, HEADS, desc.head_dim)
    return [fill(shape) for _ in range(desc.num_layers)]


@pytest.mark.parametrize("connector", ["shared-fs", "redis", "grpc"])
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 4), (4, 1), (2, 1), (2, 4)])
def test_prompt_kv_moves_between_tp_sizes(connector, prefill_tp, decode_tp, descriptor, tmp_path, redis_url):
    desc = dataclasses.replace(descriptor, model_fingerprint=uuid.uuid4().hex, num_kv_heads=HEADS)
    options = {"kv_load_timeout_s": 0.5, "kv_path": str(tmp_path / "kv"), "redis_url": redis_url}
    gen = torch.Generator().manual_seed(prefill_tp * 10 + decode_tp)
    computed = _full(desc, 8, lambda s: torch.randn(s, generator=gen))
    p = _engine(connector, "prefill", desc, prefill_tp, computed, options)
    d = _engine(connector, "decode", desc, decode_tp, _full(desc, 8, torch.zeros), options)
    try:
        prompt = list(range(50, 61))  # 11 tokens: two full blocks of 4 and a partial one
        p_blocks, d_blocks = [5, 1, 6], [2, 7, 3]
        hold, params = prefill(p, make_request("r1", prompt), p_blocks)
        if hold and connector != "grpc":
            wait_for(p, lambda: "r1" in p.released)
        assert admit(d, make_request("r1", prompt, output=[9], params=params), d_blocks) == len(prompt)
        wait_for(d, lambda: "r1" in d.output.finished_loading)
        for rank, caches in enumerate(d.worker.rank_caches):
            first, count = kv_head_range(HEADS, decode_tp, rank)
            for layer, got in zip(computed, caches):
                for i, (src, dst) in enumerate(zip(p_blocks, d_blocks)):
                    n = min(4, len(prompt) - 4 * i)
                    assert torch.equal(got[:, dst, :n], layer[:, src, :n, first:first + count])
        # The decode engine steps on while it has transfer work: its next step hands the grpc release (once
        # every rank loaded) to rank 0, which tells each prefill rank's KV server.
        wait_for(d, lambda: step(d, []) or not (d.sched.has_pending_work() or d.worker.has_pending_work()))
        wait_for(p, lambda: not p.sched.has_pending_work())  # grpc: every rank's server released the transfer
        assert p.sched.stats.blocks_held == 0
    finally:
        p.close()
        d.close()
