"""KV heads across tensor-parallel ranks: which heads a rank holds, and where a rank of one TP size finds them
among the shards of another (torch-free: the scheduler half uses it too).

Each rank of a tensor-parallel engine saves and serves only its own heads: a block object (see
:mod:`.block_format`) of rank ``s`` of ``S`` holds ``[L, 2, n, heads of rank s, D]`` and its descriptor names
``tp_rank=s, tp_size=S``. A loading rank ``r`` of ``R`` needs the heads of rank ``r`` of ``R``; it picks them out
of the sender's shards that hold them (:func:`load_plan`)::

    3 KV heads     sender TP=1: |h0 h1 h2|          sender TP=3: |h0|h1|h2|
    receiver TP=3: rank r reads h_r of the one shard  receiver TP=1: reads all three shards, one head each

With more ranks than KV heads, heads are replicated (rank ``r`` of ``R`` holds head ``r * H // R``), as the
model's ``qkv_proj`` cuts them; a receiver reads the first sender shard that holds a head it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdserve.engine.kv_transfer.block_format import IncompatibleDescriptorError, KVDescriptor

# Descriptor fields that differ between the shards of one model (everything else must be equal to exchange KV).
SHARD_FIELDS = ("tp_rank", "tp_size", "num_kv_heads")


def kv_head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``(first head, number of heads)`` of the KV heads rank ``tp_rank`` of ``tp_size`` holds."""
    if total_kv_heads >= tp_size:
        if total_kv_heads % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} does not divide {total_kv_heads} KV heads")
        per = total_kv_heads // tp_size
        return tp_rank * per, per
    if tp_size % total_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is not a multiple of {total_kv_heads} KV heads")
    return tp_rank * total_kv_heads // tp_size, 1  # replicated: tp_size / H ranks share one head


def shard_descriptor(desc: KVDescriptor, total_kv_heads: int, tp_size: int, tp_rank: int) -> KVDescriptor:
    """The descriptor of rank ``tp_rank`` of ``tp_size`` of the same cache ``desc`` is a shard of."""
    _, count = kv_head_range(total_kv_heads, tp_size, tp_rank)
    return dataclasses.replace(desc, tp_rank=tp_rank, tp_size=tp_size, num_kv_heads=count)


@dataclass(frozen=True)
class ShardPiece:
    """Heads ``[src_head, src_head + count)`` of sender shard ``sender_rank`` go to ``[dst_head, ...)`` here."""

    sender_rank: int
    src_head: int
    dst_head: int
    count: int


def load_plan(total_kv_heads: int, sender_tp: int, receiver_tp: int, receiver_rank: int) -> list[ShardPiece]:
    """Where receiver rank ``receiver_rank`` of ``receiver_tp`` finds its heads among ``sender_tp`` shards.

    With equal TP sizes it is rank ``r``'s own shard, whole (the layout of a single-rank engine's loads)."""
    if sender_tp == receiver_tp:
        _, count = kv_head_range(total_kv_heads, receiver_tp, receiver_rank)
        return [ShardPiece(receiver_rank, 0, 0, count)]
    first, count = kv_head_range(total_kv_heads, receiver_tp, receiver_rank)
    pieces: list[ShardPiece] = []
    for head in range(first, first + count):
        sender = _first_holder(total_kv_heads, sender_tp, head)
        start, _ = kv_head_range(total_kv_heads, sender_tp, sender)
        last = pieces[-1] if pieces else None
        if last is not None and last.sender_rank == sender and last.src_head + last.count == head - start:
            pieces[-1] = dataclasses.replace(last, count=last.count + 1)  # consecutive heads of one shard
        else:
            pieces.append(ShardPiece(sender, head - start, head - first, 1))
    return pieces


def senders_needed(total_kv_heads: int, sender_tp: int, receiver_tp: int) -> list[int]:
    """The sender ranks whose shards some receiver rank reads (each must hold a block for it to be loadable)."""
    return sorted({p.sender_rank for r in range(receiver_tp)
                   for p in load_plan(total_kv_heads, sender_tp, receiver_tp, r)})


def _first_holder(total_kv_heads: int, tp_size: int, head: int) -> int:
    for rank in range(tp_size):
        start, count = kv_head_range(total_kv_heads, tp_size, rank)
        if start <= head < start + count:
            return rank
    raise ValueError(f"no rank of {tp_size} holds KV head {head} of {total_kv_heads}")


def check_shard_compatible(ours: KVDescriptor, theirs: KVDescriptor, total_kv_heads: int,
                           what: str = "the prefill's KV cache") -> None:
    """Raise :class:`IncompatibleDescriptorError` unless ``theirs`` is a shard of the cache ``ours`` is a shard of:
    every field equal but the tensor-parallel layout, whose head count must fit the model's ``total_kv_heads``.
    (Equal model fingerprints mean equal head counts: the fingerprint covers the model's config.)"""
    diff = [m for m in ours.mismatches(theirs) if m.split(":", 1)[0] not in SHARD_FIELDS]
    if not diff:
        try:
            expected = kv_head_range(total_kv_heads, theirs.tp_size, min(theirs.tp_rank, theirs.tp_size - 1))[1]
        except ValueError as exc:
            diff = [f"tp_size: {exc}"]
        else:
            if theirs.num_kv_heads != expected:
                diff = [f"num_kv_heads: {theirs.num_kv_heads} per rank at tp_size {theirs.tp_size} does not fit "
                        f"{total_kv_heads} KV heads"]
    if diff:
        raise IncompatibleDescriptorError(f"{what} is incompatible with this engine's (" + "; ".join(diff) + ")")
