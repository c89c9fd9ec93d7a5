"""Flatten a :class:`SchedulerOutput` into the model's inputs and the attention metadata of one step.

Everything is built with numpy on the CPU and reaches the device in a single copy. Placeholder input tokens
(asynchronous scheduling: a token the previous step is still sampling) are then filled on the device from that
step's sampled ids, so building the step never waits for the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.core.sched_output import SchedulerOutput
from pdserve.engine.worker.attention import AttentionMetadata


def small_tensor_to(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``. On CUDA through pinned memory and a non-blocking copy: a plain
    ``torch.tensor(values, device=cuda)`` (or a pageable copy) waits for the device to finish all queued work."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass
class SampledTokens:
    """The previous step's sampled ids, still on the device: what placeholder input tokens are filled from."""

    row_of: dict[str, int]  # request id -> row of token_ids
    token_ids: torch.Tensor  # [S] int64


def placeholder_sources(request_ids: list[str], sampled: SampledTokens | None) -> list[int]:
    """For each request with a placeholder input, its row in ``sampled`` (checked: a placeholder must refer to
    the step just before)."""
    if sampled is None:
        raise ValueError("a chunk has a placeholder token but no previous step's sampled ids were given")
    try:
        return [sampled.row_of[rid] for rid in request_ids]
    except KeyError as exc:
        raise ValueError(f"request {exc.args[0]} has a placeholder token the previous step did not sample") from None


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata


def build_inputs(sched_out: SchedulerOutput, block_size: int, device: torch.device,
                 num_blocks: int | None = None, sampled: SampledTokens | None = None) -> ModelInputs:
    """The step's flattened batch. Chunks keep their order; decode rows must come first (the scheduler's
    contract), and ``num_decodes`` counts the leading one-token chunks. With ``num_blocks``, block ids are
    checked against the cache size (an out-of-range id would otherwise fault on the device). Placeholder
    tokens (negative ids) take their value from ``sampled`` on the device."""
    chunks = sched_out.chunks
    if not chunks:
        raise ValueError("cannot run an empty step")
    B = len(chunks)
    query_lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=B)
    if (query_lens <= 0).any():
        raise ValueError("every scheduled chunk needs at least one token")
    context_lens = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=B)
    seq_lens = context_lens + query_lens
    query_start_loc = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    T = int(query_start_loc[-1])

    max_blocks = max(len(c.block_ids) for c in chunks)
    if device.type == "cuda":
        # Triton compiles a kernel variant per "row stride divisible by 16 or not": a width that is always a
        # multiple of 16 keeps the attention kernel to the variants compiled at warm-up.
        max_blocks = -(-max_blocks // 16) * 16
    block_tables = np.zeros((B, max_blocks), dtype=np.int64)
    for i, c in enumerate(chunks):
        if len(c.block_ids) * block_size < seq_lens[i]:
            raise ValueError(f"request {c.request_id}: {len(c.block_ids)} blocks cannot hold {seq_lens[i]} tokens")
        block_tables[i, : len(c.block_ids)] = c.block_ids
    if num_blocks is not None and (block_tables.max() >= num_blocks or block_tables.min() < 0):
        raise ValueError(f"a block id is outside the KV cache's {num_blocks} blocks")

    input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64, count=T)
    seq_of_token = np.repeat(np.arange(B), query_lens)  # [T]
    positions = np.arange(T) - query_start_loc[seq_of_token] + context_lens[seq_of_token]  # [T]
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    sample_mask = np.fromiter((c.sample for c in chunks), dtype=bool, count=B)
    logits_indices = query_start_loc[1:][sample_mask] - 1  # last row of each sampled chunk
    if any(c.num_draft_tokens for c in chunks):
        # Speculative decoding: a chunk with d drafts gets its last d + 1 rows (see ScheduledChunk).
        logits_indices = np.concatenate([np.arange(end - c.num_logits_rows, end) for c, end
                                         in zip(chunks, query_start_loc[1:].tolist()) if c.sample])
    num_decodes = int(np.argmin(query_lens == 1)) if (query_lens != 1).any() else B

    # One host-to-device copy of everything, sliced apart on the device.
    parts = [input_ids, positions, slot_mapping, logits_indices, query_start_loc, seq_lens, context_lens,
             block_tables.reshape(-1)]
    holes = np.flatnonzero(input_ids < 0)  # placeholders: at most one per chunk, in decode rows
    if holes.size:
        sources = placeholder_sources([chunks[i].request_id for i in seq_of_token[holes]], sampled)
        input_ids[holes] = 0
        parts += [holes, np.asarray(sources, dtype=np.int64)]
    # Every part starts on a 16-byte boundary (an even int64 offset): Triton also compiles a variant per
    # pointer alignment, and an odd token count would otherwise shift the parts after it.
    sizes = [len(p) for p in parts]
    padded = [n + (n & 1) for n in sizes]
    flat = np.zeros(sum(padded), dtype=np.int64)
    offset = 0
    for part, width in zip(parts, padded):
        flat[offset:offset + len(part)] = part
        offset += width
    packed = torch.from_numpy(flat)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    views = [v[:n] for v, n in zip(torch.split(packed, padded), sizes)]
    if holes.size:  # ordered after the previous step's sampling on the device: no host wait
        views[0].index_copy_(0, views[8], sampled.token_ids.index_select(0, views[9]))
    i32 = [v.to(torch.int32) for v in views[4:8]]
    md = AttentionMetadata(
        num_tokens=T,
        query_start_loc=i32[0],
        seq_lens=i32[1],
        context_lens=i32[2],
        block_tables=i32[3].view(B, max_blocks),
        slot_mapping=views[2],
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        num_decodes=num_decodes,
        logits_indices=views[3],
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
        context_lens_cpu=context_lens.tolist(),
    )
    return ModelInputs(input_ids=views[0], positions=views[1], attn_metadata=md)
