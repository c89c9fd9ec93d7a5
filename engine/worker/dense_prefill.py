"""Fresh long prompts attend over their own K/V with cuDNN's fused attention instead of the paged kernel.

Why: a prompt chunk with nothing cached before it (``context_len == 0``) attends only to the K/V computed in
this very step, which already sit contiguous in the projection's output. The paged Triton kernel must gather
them back from cache blocks with pointer loads; cuDNN's Hopper kernel (TMA loads, warp-specialised tensor-core
pipeline) runs the same causal attention faster once the prompt is long enough for attention to matter
(measured on an H100, docs/performance.md "Prefill at 4k and 32k"). The K/V are still written to the cache by
the caller, so later chunks and decodes read them from there as before.

Off by default; ``PDSERVE_DENSE_PREFILL=N`` turns it on for prompts of at least ``N`` tokens. Torch builds a
cuDNN graph for every distinct prompt length, the first time it sees it, and a build can take hundreds of
milliseconds (SGLang's cuDNN backend measured ~400 ms; not measured here). In serving every prompt has its own
length, so the builds land in live traffic: with the path on, ``pdserve up``'s prefill engine, which sees only
fresh prompts, had a TTFT p99 of 434 ms on an H100 where the monolithic engine had 36 ms (builds are the
suspected cause, not profiled). The path suits offline runs and benchmarks of long prompts of few distinct
lengths: a 32k-token Llama-3.1-8B prefill takes 1,198 ms instead of 1,428 ms on an H100 (docs/performance.md).

Only eager steps take this path (never a CUDA-graph capture: graphs hold decode and short mixed steps), only
float16/bfloat16 caches of the query's dtype (an FP8 cache would make the prompt's own attention see unrounded
K/V while every later token sees the rounded ones), and only when every sequence of the step is a fresh
prompt of at least ``min_tokens`` tokens, so no sequence needs the paged kernel as well.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from pdserve.engine.worker.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def _min_tokens_from_env() -> int | None:
    """``PDSERVE_DENSE_PREFILL``: unset or ``0``: off (the default); ``N``: on for prompts of ``N``+ tokens."""
    raw = os.environ.get("PDSERVE_DENSE_PREFILL", "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"PDSERVE_DENSE_PREFILL must be an integer (0 turns it off), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"PDSERVE_DENSE_PREFILL must be >= 0, got {value}")
    return value or None


def fresh_long_prompts(metadata: AttentionMetadata, min_tokens: int) -> bool:
    """Whether every sequence of the step is a prompt with nothing cached before it and at least
    ``min_tokens`` tokens in this step."""
    starts = metadata.query_start_loc_cpu
    if len(starts) < 2 or any(metadata.context_lens_cpu):
        return False
    return min(b - a for a, b in zip(starts, starts[1:])) >= min_tokens


class DensePrefill:
    """Decides per step whether the fresh-prompt path applies, and runs it.

    Args:
        min_tokens: shortest prompt (tokens in the step) that takes the path; ``None`` turns it off
            (:meth:`from_env` reads it from ``PDSERVE_DENSE_PREFILL``).
    """

    def __init__(self, min_tokens: int | None) -> None:
        self.min_tokens = min_tokens
        self._gqa_native = True  # cleared once if this build's cuDNN path refuses enable_gqa
        self._unavailable = False  # set once if cuDNN attention cannot run here at all

    @classmethod
    def from_env(cls) -> "DensePrefill":
        """The setting of ``PDSERVE_DENSE_PREFILL``: off when unset or 0; a bad value raises ValueError."""
        return cls(_min_tokens_from_env())

    def applies(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> bool:
        """Whether this step's attention can run on its own K/V (see the module docstring)."""
        if self.min_tokens is None or self._unavailable:
            return False
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or kv_cache.dtype != q.dtype:
            return False
        return fresh_long_prompts(metadata, self.min_tokens) and not torch.cuda.is_current_stream_capturing()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata,
               scale: float | None) -> torch.Tensor | None:
        """Causal attention of each prompt over itself: ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (any row
        stride) -> ``[T, Hq, D]``; None if cuDNN attention turns out not to be available (the caller then runs
        the paged kernel, and this object stops trying)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        starts = metadata.query_start_loc_cpu
        group = q.shape[1] // k.shape[1]
        out = None
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                for a, b in zip(starts, starts[1:]):
                    # [L, H, D] -> [1, H, L, D]: a view, the layout SDPA takes.
                    qs, ks, vs = (t[a:b].unsqueeze(0).transpose(1, 2) for t in (q, k, v))
                    res = self._sdpa(qs, ks, vs, scale, group)[0].transpose(0, 1)  # [L, H, D]
                    if len(starts) == 2 and b - a == q.shape[0] and res.is_contiguous():
                        # cuDNN lays its output out as [L, H, D] already: one prompt needs no copy (at 32k
                        # tokens the copy costs 0.4 ms a layer on an H100).
                        return res
                    if out is None:
                        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
                    out[a:b].copy_(res)
        except RuntimeError as err:  # no cuDNN attention for this device/build/shape: the paged kernel serves
            self._unavailable = True
            logger.warning("cuDNN attention is not available (%s); fresh prompts use the paged kernel", err)
            return None
        return out

    def _sdpa(self, q, k, v, scale, group):
        if self._gqa_native:
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            except RuntimeError:
                self._gqa_native = False  # this build wants as many K/V heads as query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
