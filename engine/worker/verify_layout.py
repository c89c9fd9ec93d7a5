"""Which verify steps a CUDA graph covers, and how one is laid out in a graph's static buffers (pure numpy).

A speculative verify step gives each request a chunk ``[last token, d_1 .. d_n]`` (``n <= k`` drafts). The verify
graphs (:mod:`pdserve.engine.worker.verify_graphs`) have one graph per batch size ``N`` of a ladder, each with
``N * (k + 1)`` token rows. A step of ``B <= N`` chunks packs its tokens from row 0 on, varlen, exactly as an eager
step would (``query_start_loc`` is data, not shape: the attention kernel's grid depends only on the row and
sequence counts); what is left over is padding::

    rows        0 .. S-1: the live chunks' tokens, chunk after chunk        S .. N(k+1)-1: padding
    sequences   0 .. B-1: the live chunks                                    B .. N-1: padding, zero tokens each
    slot        each token's KV slot                                         -1: nothing is written
    position    start_pos + i                                                0
    seq_len     start_pos + len(chunk)                                       0 (no key is read)

Why one graph per batch size with room for ``k + 1`` tokens per sequence, rather than a graph per draft count:
a step mixes draft counts (the n-gram proposer finds different lengths, drafts are cut at ``max_tokens``, adaptive
k proposes ``k // 2`` at medium batch and one-token probes), so a per-count ladder would still pad; and in the
memory-bound regime where speculation runs, ``N (k + 1)`` rows cost about what fewer do. It also keeps each graph
size's numerics fixed: the same kernels (and matmul shapes) whatever the step's drafts.
"""

from __future__ import annotations

import bisect

import numpy as np

from pdserve.engine.core.sched_output import ScheduledChunk
from pdserve.engine.worker.packed_layout import fill_packed_layout

# Beyond this batch a verify step of k + 1 tokens per sequence is compute-heavy enough that launch overhead no
# longer matters, and speculation rarely pays there (adaptive k switches it off at 32 running requests).
MAX_VERIFY_CAPTURE_SIZE = 64


def verify_capture_sizes(decode_sizes: list[int], max_num_seqs: int, disable_by_batch_size: int | None) -> list[int]:
    """The verify ladder: the decode ladder's sizes up to the bound, the first size at or past it included.

    The bound is the largest batch a verify step can have: ``max_num_seqs``, at most :data:`MAX_VERIFY_CAPTURE_SIZE`,
    and with adaptive k (``disable_by_batch_size`` given) less than ``disable_by_batch_size`` (at that many
    running requests nothing is proposed).
    """
    top = min(max_num_seqs, MAX_VERIFY_CAPTURE_SIZE)
    if disable_by_batch_size is not None:
        top = min(top, disable_by_batch_size - 1)
    top = max(1, top)
    cut = bisect.bisect_left(decode_sizes, top)
    return decode_sizes[:cut + 1] if cut < len(decode_sizes) else list(decode_sizes)


def verify_graph_size(chunks: list[ScheduledChunk], sizes: list[int], tokens_per_seq: int) -> int | None:
    """The batch size of the verify graph this step replays, or None when no verify graph covers it.

    Covered: at least one chunk carries drafts, and every chunk is a sampled decode chunk (its first token the
    newest known one, the rest drafts) of at most ``tokens_per_seq`` known token ids, no placeholder among them
    (drafts come only in synchronous steps, so none is expected).
    """
    if not chunks or len(chunks) > sizes[-1] or not any(c.num_draft_tokens for c in chunks):
        return None
    for c in chunks:
        n = c.num_tokens
        if not c.sample or n != 1 + c.num_draft_tokens or n > tokens_per_seq or min(c.token_ids) < 0:
            return None
    return sizes[bisect.bisect_left(sizes, len(chunks))]


def fill_verify_layout(chunks: list[ScheduledChunk], size: int, tokens_per_seq: int, block_size: int, *,
                       ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, query_start_loc: np.ndarray,
                       seq_lens: np.ndarray, context_lens: np.ndarray, logits_rows: np.ndarray) -> int:
    """Write a verify step's layout into host arrays of a ``size``-sequence graph (``size * tokens_per_seq``
    rows); returns the number of logits rows. See :func:`~pdserve.engine.worker.packed_layout.fill_packed_layout`.
    """
    return fill_packed_layout(chunks, size, size * tokens_per_seq, block_size, ids=ids, positions=positions,
                              slots=slots, query_start_loc=query_start_loc, seq_lens=seq_lens,
                              context_lens=context_lens, logits_rows=logits_rows)
