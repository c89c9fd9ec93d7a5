"""Tensor-parallel layers, and where a rank sits in the tensor × pipeline grid.

Megatron-style sharding: a *column-parallel* linear splits its output features across the ``tp`` ranks (each
computes its slice, no communication); a *row-parallel* linear splits its input features, so each rank computes a
partial sum and one all-reduce adds them. Attention is column-parallel over heads (``qkv_proj``) followed by a
row-parallel ``o_proj``; the MLP is column-parallel ``gate_up_proj`` then row-parallel ``down_proj``: one
all-reduce after attention, one after the MLP. The vocabulary of the embedding and of the LM head is split in
contiguous ranges (padded to a multiple of ``tp``); the embedding all-reduces (each token's row lives on one
rank, the others add zeros) and the head all-gathers the logits.

KV heads: with ``tp`` dividing ``Hkv`` each rank holds ``Hkv / tp`` of them; with fewer KV heads than ranks
(``tp`` a multiple of ``Hkv``) each KV head is replicated on ``tp / Hkv`` ranks, each of which holds the query
heads of its group. Any other head count is refused (:func:`heads_per_rank`).

Weight loaders take the checkpoint tensor (or a lazy slice of it, see
:class:`pdserve.engine.model_loader.weights.LazyTensor`) and read only the rank's rows or columns, so a rank
never materialises a full sharded tensor. With ``tp == 1`` the models use the plain layers of
:mod:`pdserve.engine.models.layers` (the single-device path is unchanged).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.models.layers import FusedLinear, Linear, _skinny_fits


@dataclass(frozen=True)
class ModelShard:
    """This rank's place: ``tp_rank`` of ``tp_size`` within pipeline stage ``pp_rank`` of ``pp_size``.

    ``tp_group`` is the torch.distributed process group of the stage's tensor-parallel ranks (None when
    ``tp_size == 1``).
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """The decoder layers ``[start, end)`` of this stage: contiguous, the first stages take one more when
        ``pp_size`` does not divide ``num_layers``."""
        if self.pp_size > num_layers:
            raise ValueError(f"pipeline_parallel_size={self.pp_size} exceeds the model's {num_layers} layers")
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return start, start + base + (1 if self.pp_rank < extra else 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)


NO_SHARD = ModelShard()


def heads_per_rank(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """``(query heads, KV heads)`` one rank holds; ``ValueError`` for a head count ``tp_size`` cannot split."""
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} does not divide the model's {num_heads} attention heads")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} does not divide the model's {num_kv_heads} KV heads")
        return num_heads // tp_size, num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is not a multiple of the model's {num_kv_heads} KV heads "
                         f"(with fewer KV heads than ranks, each KV head is replicated on the same number of ranks)")
    return num_heads // tp_size, 1


def narrow(loaded: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows/columns ``[start, start + length)`` of a checkpoint tensor or lazy slice (only those are read)."""
    return loaded.narrow(dim, start, length)


def _copy_checked(dest: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dest.shape != src.shape:
        raise ValueError(f"{what}: checkpoint slice of shape {tuple(src.shape)} != parameter {tuple(dest.shape)}")
    dest.copy_(src)


class ShardedFusedLinear(FusedLinear):
    """A column-parallel fused projection: each shard id's output rows are cut per rank.

    ``cuts`` maps a shard id to ``(start, width)`` of the rank's rows *in the checkpoint tensor*; the local
    parameter stacks the widths in the same order. Serves ``qkv_proj`` (see :func:`qkv_parallel_linear`) and
    ``gate_up_proj``.
    """

    def __init__(self, in_features: int, cuts: dict[Any, tuple[int, int]], bias: bool = False) -> None:
        super().__init__(in_features, {k: width for k, (_, width) in cuts.items()}, bias)
        for p in self.parameters():
            p.weight_loader = functools.partial(_load_cut, dict(self.offsets), dict(cuts))


def _load_cut(offsets: dict[Any, tuple[int, int]], cuts: dict[Any, tuple[int, int]], param: nn.Parameter,
              loaded: Any, shard_id: Any) -> None:
    start, width = offsets[shard_id]
    src_start, src_width = cuts[shard_id]
    _copy_checked(param.data.narrow(0, start, width), narrow(loaded, 0, src_start, src_width), f"shard {shard_id!r}")


def qkv_parallel_linear(hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                        shard: ModelShard) -> FusedLinear:
    """``qkv_proj`` for this rank: its query heads, and its KV heads (replicated when ``tp > Hkv``)."""
    if shard.tp_size == 1:
        return FusedLinear(hidden, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                    "v": num_kv_heads * head_dim}, bias=bias)
    hq, hkv = heads_per_rank(num_heads, num_kv_heads, shard.tp_size)
    if num_kv_heads >= shard.tp_size:
        kv_start = shard.tp_rank * hkv
    else:  # ranks tp_rank // (tp / Hkv) share KV head number tp_rank * Hkv // tp
        kv_start = shard.tp_rank * num_kv_heads // shard.tp_size
    kv = (kv_start * head_dim, hkv * head_dim)
    return ShardedFusedLinear(hidden, {"q": (shard.tp_rank * hq * head_dim, hq * head_dim), "k": kv, "v": kv},
                              bias=bias)


def merged_column_parallel_linear(in_features: int, widths: dict[Any, int], bias: bool,
                                  shard: ModelShard) -> FusedLinear:
    """Several column-parallel projections of one input (``gate_up_proj``), each split evenly across ranks."""
    if shard.tp_size == 1:
        return FusedLinear(in_features, widths, bias=bias)
    cuts = {}
    for key, width in widths.items():
        if width % shard.tp_size:
            raise ValueError(f"tensor_parallel_size={shard.tp_size} does not divide the projection width {width}")
        local = width // shard.tp_size
        cuts[key] = (shard.tp_rank * local, local)
    return ShardedFusedLinear(in_features, cuts, bias=bias)


class RowParallelLinear(Linear):
    """Input features split across ranks: a partial product per rank, summed by one all-reduce; the bias (not
    split) is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, shard: ModelShard) -> None:
        if in_features % shard.tp_size:
            raise ValueError(f"tensor_parallel_size={shard.tp_size} does not divide the input width {in_features}")
        local = in_features // shard.tp_size
        super().__init__(local, out_features, bias=bias)
        self.shard = shard
        self.weight.weight_loader = functools.partial(_load_columns, shard.tp_rank * local, local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and _skinny_fits(x, self.weight):
            from pdserve.kernels.skinny import skinny_linear

            partial = skinny_linear(x, self.weight, None)
        else:
            partial = F.linear(x, self.weight)
        y = self.shard.all_reduce(partial)
        return y if self.bias is None else y + self.bias


def _load_columns(start: int, width: int, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    _copy_checked(param.data, narrow(loaded, 1, start, width), "row-parallel weight")


def row_parallel_linear(in_features: int, out_features: int, bias: bool, shard: ModelShard) -> Linear:
    if shard.tp_size == 1:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, shard)


class VocabParallelEmbedding(nn.Module):
    """The rows ``[start, end)`` of a ``[V, D]`` table (the vocabulary padded to a multiple of ``tp``).

    As the embedding: ids outside the range give zeros, and an all-reduce puts each token's row together. As the
    LM head (:meth:`logits`): each rank's ``[S, V/tp]`` slice, all-gathered and cut back to ``V``.
    """

    def __init__(self, vocab_size: int, dim: int, shard: ModelShard) -> None:
        super().__init__()
        self.vocab_size, self.shard = vocab_size, shard
        per_rank = -(-vocab_size // shard.tp_size)
        self.start = shard.tp_rank * per_rank
        self.end = self.start + per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, dim))
        self.weight.weight_loader = functools.partial(_load_vocab_rows, self.start, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.end)  # [T]
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)  # [T, D]
        return self.shard.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [S, D]`` -> ``[S, V]`` (every rank gets all of it)."""
        return self.shard.all_gather_last_dim(F.linear(hidden, self.weight))[:, :self.vocab_size]


def _load_vocab_rows(start: int, vocab_size: int, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    rows = max(0, min(param.shape[0], vocab_size - start))
    if rows:
        _copy_checked(param.data[:rows], narrow(loaded, 0, start, rows), "vocabulary rows")
    param.data[rows:].zero_()  # padding rows: never looked up, their logits are cut off
