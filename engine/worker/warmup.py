"""Compile every Triton kernel variant that an eager step can need before the first request arrives.

The attention kernel picks its tile shape and whether to split the KV range from the shape of the batch (see
``default_config`` and ``default_num_splits`` in :mod:`pdserve.kernels.attention`), and every combination is
its own Triton compilation of a second or two. Left to chance they compile in the middle of serving: a first
Qwen3-0.6B throughput run on an H200 spent about 4.8 s of its 14.4 s in 154 mixed prefill + decode steps, ~31 ms
each, where a warm step takes a few. So the runner first runs a handful of throwaway eager steps that hit each
combination: query lengths on both sides of every tile-shape threshold, one sequence and enough sequences to
fill the GPU, and a fresh prompt and a chunk over a longer cached context (split-KV off and on).

The steps write garbage K/V into the first blocks of the cache. That is harmless: no request exists yet, and
every slot a request reads was written by that request's own token first.
"""

from __future__ import annotations

import logging
import time

from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput

logger = logging.getLogger(__name__)

_LONG_CONTEXT = 256  # at least two KV tiles of up to 128 keys: enough for the split-KV path to engage


def warmup_cases(group: int, num_kv_heads: int, num_sms: int, max_num_seqs: int,
                 max_query_len: int) -> list[tuple[int, int, int]]:
    """``(num_seqs, query_len, context_len)`` of the warm-up steps for a model with ``group`` query heads
    per KV head.

    The tile shape changes where ``group * query_len`` crosses 16, 32 and 64 rows; from ``num_seqs *
    num_kv_heads >= num_sms / 2`` on, decode-like launches take narrower key tiles; split-KV engages for
    query lengths up to 16 over contexts longer than one key tile.
    """
    queries = {1, max(1, 16 // group), max(1, 32 // group), max(1, 64 // group), 64 // group + 1}
    queries = sorted(q for q in queries if q <= max_query_len)
    many = min(max_num_seqs, -(-num_sms // (2 * num_kv_heads)))
    cases = []
    for q in queries:
        for seqs in sorted({1, many}):
            contexts = (0, _LONG_CONTEXT) if q <= 16 else (0,)
            cases += [(seqs, q, ctx) for ctx in contexts]
    return cases


def warm_up(run_step, cases: list[tuple[int, int, int]], block_size: int, num_blocks: int) -> None:
    """Run ``run_step(SchedulerOutput)`` once per case that fits in ``num_blocks`` cache blocks."""
    start = time.perf_counter()
    done = 0
    for seqs, q, ctx in cases:
        per_seq = -(-(ctx + q) // block_size)
        if seqs * per_seq > num_blocks:
            continue
        chunks = [ScheduledChunk(f"warmup-{i}", [0] * q, ctx, list(range(i * per_seq, (i + 1) * per_seq)), True)
                  for i in range(seqs)]
        run_step(SchedulerOutput(chunks=chunks))
        done += 1
    logger.info("warmed up %d eager step shapes in %.1fs", done, time.perf_counter() - start)
