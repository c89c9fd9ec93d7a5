"""Attention metadata for hand-written steps (blocks handed out in order), shared by the backend tests."""

from __future__ import annotations

import torch

from pdserve.engine.worker.attention import AttentionMetadata


def step_metadata(q_lens: list[int], ctx_lens: list[int], block_size: int, device) -> AttentionMetadata:
    """Blocks handed out in order; new tokens' slots follow from the block tables."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    tables, slots, next_block = [], [], 0
    for q_len, ctx, n in zip(q_lens, ctx_lens, per_seq):
        table = list(range(next_block, next_block + n))
        next_block += n
        tables.append(table + [0] * (max(per_seq) - n))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + q_len)]
    qsl = [0]
    for q_len in q_lens:
        qsl.append(qsl[-1] + q_len)
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        num_tokens=qsl[-1], query_start_loc=torch.tensor(qsl, **i32), seq_lens=torch.tensor(seq_lens, **i32),
        context_lens=torch.tensor(ctx_lens, **i32), block_tables=torch.tensor(tables, **i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device), max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), num_decodes=sum(1 for q in q_lens if q == 1),
        logits_indices=torch.tensor(qsl[1:], device=device) - 1, query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens, context_lens_cpu=ctx_lens,
    )
