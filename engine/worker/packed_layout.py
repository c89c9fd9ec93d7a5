"""A step's chunks packed into the static buffers of a CUDA graph with room for ``R`` token rows and ``N``
sequences (pure numpy; the verify and the mixed-step graphs share it).

The live chunks' tokens go from row 0 on, varlen, exactly as an eager step packs them (``query_start_loc`` is
data, not shape: the attention kernel's grid depends only on the row and sequence counts); what is left is
padding::

    rows        0 .. S-1: the live chunks' tokens, chunk after chunk        S .. R-1: padding
    sequences   0 .. B-1: the live chunks                                    B .. N-1: padding, zero tokens each
    slot        each token's KV slot                                         -1: nothing is written
    position    start_pos + i                                                0
    seq_len     start_pos + len(chunk)                                       0 (no key is read)

Padding rows belong to no sequence, so the attention kernel never reads or writes for them; what the rest of the
forward pass computes for them is thrown away (every other layer works row by row).
"""

from __future__ import annotations

import numpy as np

from pdserve.engine.core.sched_output import ScheduledChunk


def fill_packed_layout(chunks: list[ScheduledChunk], num_seqs: int, num_rows: int, block_size: int, *,
                       ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, query_start_loc: np.ndarray,
                       seq_lens: np.ndarray, context_lens: np.ndarray, logits_rows: np.ndarray) -> int:
    """Write a step's layout (module docstring) into host arrays; returns the number of logits rows.

    ``ids``, ``positions``, ``slots``: ``[num_rows]``; ``query_start_loc``: ``[num_seqs + 1]``; ``seq_lens``,
    ``context_lens``: ``[num_seqs]``; ``logits_rows``: at least as long as the step's logits rows (each sampled
    chunk's last ``num_logits_rows`` rows, in chunk order, as the eager runner returns them). Token ids are
    copied as they are, placeholders (negative ids) included. Raises ValueError when a block table is too
    short for its chunk or the step does not fit.
    """
    b = len(chunks)
    lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=b)
    starts = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=b)
    query_start_loc[0] = 0
    np.cumsum(lens, out=query_start_loc[1:b + 1])
    total = int(query_start_loc[b])
    if b > num_seqs or total > num_rows:
        raise ValueError(f"{b} chunks of {total} tokens do not fit {num_seqs} sequences of {num_rows} rows")
    query_start_loc[b + 1:num_seqs + 1] = total
    seq_lens[:b] = starts + lens
    seq_lens[b:num_seqs] = 0
    context_lens[:b] = starts
    context_lens[b:num_seqs] = 0

    seq_of_row = np.repeat(np.arange(b), lens)  # [S]
    pos = np.arange(total) - query_start_loc[:b][seq_of_row] + starts[seq_of_row]
    block_index = pos // block_size
    table_lens = np.fromiter((len(c.block_ids) for c in chunks), dtype=np.int64, count=b)
    if (block_index >= table_lens[seq_of_row]).any():
        raise ValueError("a block table is too short for its sequence")
    flat_tables = np.fromiter((x for c in chunks for x in c.block_ids), dtype=np.int64, count=int(table_lens.sum()))
    table_start = np.concatenate(([0], np.cumsum(table_lens)[:-1]))
    ids[:total] = [t for c in chunks for t in c.token_ids]
    positions[:total] = pos
    slots[:total] = flat_tables[table_start[seq_of_row] + block_index] * block_size + pos % block_size
    ids[total:num_rows] = 0
    positions[total:num_rows] = 0
    slots[total:num_rows] = -1

    n = 0
    for c, stop in zip(chunks, query_start_loc[1:b + 1].tolist()):
        k = c.num_logits_rows
        logits_rows[n:n + k] = range(stop - k, stop)
        n += k
    return n
