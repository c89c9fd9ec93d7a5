"""Tensor-parallel sharding in one process (no process group needed to build and load a shard): which heads and
rows each rank holds, KV-head replication, vocabulary ranges, pipeline layer ranges, and lazy checkpoint slices."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pdserve.engine.model_loader.weights import iter_safetensors
from pdserve.engine.models.parallel_layers import (
    ModelShard,
    RowParallelLinear,
    VocabParallelEmbedding,
    heads_per_rank,
    merged_column_parallel_linear,
    qkv_parallel_linear,
)


@pytest.mark.parametrize(("heads", "kv", "tp", "expected"), [
    (9, 3, 3, (3, 1)), (9, 3, 1, (9, 3)), (4, 2, 2, (2, 1)), (4, 2, 4, (1, 1)), (32, 8, 8, (4, 1)),
    (32, 8, 16, (2, 1)), (32, 8, 2, (16, 4)), (9, 3, 9, (1, 1)),
])
def test_heads_per_rank(heads: int, kv: int, tp: int, expected: tuple[int, int]) -> None:
    assert heads_per_rank(heads, kv, tp) == expected


@pytest.mark.parametrize(("heads", "kv", "tp", "message"), [
    (9, 3, 2, "does not divide the model's 9 attention heads"),
    (12, 6, 4, "does not divide the model's 6 KV heads"),
    (24, 8, 12, "is not a multiple of the model's 8 KV heads"),
])
def test_head_counts_that_do_not_split_are_refused(heads: int, kv: int, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        heads_per_rank(heads, kv, tp)


def _shard(rank: int, tp: int) -> ModelShard:
    return ModelShard(tp_rank=rank, tp_size=tp)


def test_qkv_rows_per_rank_with_replicated_kv_heads() -> None:
    dh, hidden = 2, 3
    q = torch.arange(4 * dh * hidden, dtype=torch.float32).view(4 * dh, hidden)  # 4 query heads
    k = 100 + torch.arange(2 * dh * hidden, dtype=torch.float32).view(2 * dh, hidden)  # 2 KV heads
    v = -k
    for rank in range(4):  # tp=4 > 2 KV heads: ranks 0,1 share KV head 0; ranks 2,3 KV head 1
        layer = qkv_parallel_linear(hidden, dh, 4, 2, bias=False, shard=_shard(rank, 4))
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            layer.weight.weight_loader(layer.weight, tensor, name)
        kv_head = rank // 2
        want = torch.cat([q[rank * dh:(rank + 1) * dh], k[kv_head * dh:(kv_head + 1) * dh],
                          v[kv_head * dh:(kv_head + 1) * dh]])
        assert torch.equal(layer.weight.data, want)


def test_gate_up_and_row_parallel_shards_compose_to_the_full_mlp() -> None:
    torch.manual_seed(0)
    hidden, inter, tp = 4, 6, 2
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    x = torch.randn(3, hidden)
    full = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    partials = []
    for rank in range(tp):
        gate_up = merged_column_parallel_linear(hidden, {0: inter, 1: inter}, bias=False, shard=_shard(rank, tp))
        gate_up.weight.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight.weight_loader(gate_up.weight, up, 1)
        row = RowParallelLinear(inter, hidden, bias=False, shard=_shard(rank, tp))
        row.weight.weight_loader(row.weight, down)
        g, u = gate_up(x).chunk(2, dim=-1)
        partials.append(torch.nn.functional.linear(torch.nn.functional.silu(g) * u, row.weight))
    torch.testing.assert_close(sum(partials), full)  # what the all-reduce adds up


def test_vocab_rows_are_padded_and_cut() -> None:
    table = torch.arange(10 * 2, dtype=torch.float32).view(10, 2)  # vocab 10 over 3 ranks: 4 + 4 + 2 (+2 padding)
    shards = []
    for rank in range(3):
        emb = VocabParallelEmbedding(10, 2, _shard(rank, 3))
        emb.weight.weight_loader(emb.weight, table)
        shards.append(emb.weight.data)
    assert [s.shape[0] for s in shards] == [4, 4, 4]
    assert torch.equal(torch.cat(shards)[:10], table) and not torch.cat(shards)[10:].any()


@pytest.mark.parametrize(("layers", "pp", "ranges"), [
    (30, 2, [(0, 15), (15, 30)]), (2, 2, [(0, 1), (1, 2)]), (7, 3, [(0, 3), (3, 5), (5, 7)]),
])
def test_pipeline_layer_ranges(layers: int, pp: int, ranges: list[tuple[int, int]]) -> None:
    assert [ModelShard(pp_rank=r, pp_size=pp).layer_range(layers) for r in range(pp)] == ranges


def test_lazy_checkpoint_slices_read_only_the_rows_asked_for(tmp_path) -> None:
    full = torch.arange(24, dtype=torch.float32).view(6, 4)
    save_file({"w": full}, str(tmp_path / "model.safetensors"))
    ((name, lazy),) = list(iter_safetensors(tmp_path, lazy=True))
    assert name == "w" and tuple(lazy.shape) == (6, 4)
    assert torch.equal(lazy.narrow(0, 2, 3), full[2:5]) and torch.equal(lazy.narrow(1, 1, 2), full[:, 1:3])
    assert torch.equal(lazy.full(), full)
