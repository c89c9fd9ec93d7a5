"""Fresh long prompts attend over their own K/V with cuDNN's fused attention instead of the paged kernel.

Why: a prompt chunk with nothing cached before it (``context_len == 0``) attends only to the K/V computed in
this very step, which already sit contiguous in the projection's output. The paged Triton kernel must gather
them back from cache blocks with pointer loads; cuDNN's Hopper kernel (TMA loads, warp-specialised tensor-core
pipeline) runs the same causal attention faster once the prompt is long enough for attention to matter
(measured on an H100, docs/performance.md "Prefill at 4k and 32k"). The K/V are still written to the cache by
the caller, so later chunks and decodes read them from there as before.

Off by default; ``PDSERVE_DENSE_PREFILL=N`` turns it on for prompts of at least ``N`` tokens (it pays off only
where attention is a large share of a step: long prompts, large models; docs/engine.md). Torch builds a cuDNN
graph for every distinct shape, the first time it sees it, and a build (~70 ms for Llama-3.1-8B's heads on an
H100) would stall every stream of a serving engine. So prompts never reach cuDNN at their own
length: each is padded to a *bucket* (:func:`bucket_len`: a multiple of 1/16 of its power-of-two ceiling, at least
256), whose padded rows are zeros that no real row sees (the mask is causal and the padding comes last), and the
engine builds every bucket's graph up front: the first call, which the runner's warm-up makes, builds them all
(:meth:`DensePrefill.limit` sets the longest prompt chunk a step can hold). Each prompt then runs in a packed
``[Lp, Hq + 2 Hkv, D]`` buffer, so the projection's own output (already that layout) of a prompt whose length is a
bucket is used as it is, and every other prompt is copied into one; either way the graph is the bucket's.
A 32k-token Llama-3.1-8B prefill took 1,198 ms instead of 1,428 ms on an H100 (docs/performance.md).

Only eager steps take this path (never a CUDA-graph capture: graphs hold decode and short mixed steps), only
float16/bfloat16 caches of the query's dtype (an FP8 cache would make the prompt's own attention see unrounded
K/V while every later token sees the rounded ones), and only when every sequence of the step is a fresh
prompt of at least ``min_tokens`` tokens, so no sequence needs the paged kernel as well.
"""

from __future__ import annotations

import logging
import os
import time

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


_MIN_BUCKET = 256


def bucket_len(length: int) -> int:
    """The padded length a prompt of ``length`` tokens attends at: the next multiple of 1/16 of its power-of-two
    ceiling (at least 256). 16 buckets an octave keep the padding under 1/8 of the prompt (under 1/4 of its
    attention work) and the graph count to ~16 per doubling of the longest prompt."""
    ceiling = 1 << max(0, length - 1).bit_length()
    step = max(_MIN_BUCKET, ceiling // 16)
    return -(-length // step) * step


def buckets(min_tokens: int, max_tokens: int) -> list[int]:
    """Every bucket a prompt of ``min_tokens`` to ``max_tokens`` tokens can fall in, ascending."""
    out: list[int] = []
    length = bucket_len(min_tokens)
    while length <= bucket_len(max_tokens):
        out.append(length)
        length = bucket_len(length + 1)
    return out


class DensePrefill:
    """Decides per step whether the fresh-prompt path applies, and runs it.

    Args:
        min_tokens: shortest prompt (tokens in the step) that takes the path; ``None`` turns it off
            (:meth:`from_env` reads it from ``PDSERVE_DENSE_PREFILL``).
    """

    def __init__(self, min_tokens: int | None) -> None:
        self.min_tokens = min_tokens
        self.max_tokens: int | None = None  # the longest prompt chunk a step holds (:meth:`limit`)
        self._built: set[tuple] = set()  # head/dtype/scale signatures whose bucket graphs are built
        self._gqa_native = True  # cleared once if this build's cuDNN path refuses enable_gqa
        self._unavailable = False  # set once if cuDNN attention cannot run here at all

    @classmethod
    def from_env(cls) -> "DensePrefill":
        """The setting of ``PDSERVE_DENSE_PREFILL``: off when unset or 0; a bad value raises ValueError."""
        return cls(_min_tokens_from_env())

    @property
    def enabled(self) -> bool:
        """Whether the path is on and has not been found unavailable."""
        return self.min_tokens is not None and not self._unavailable

    def limit(self, max_tokens: int) -> None:
        """The longest prompt chunk one step can hold: graphs are built for the buckets up to it, and a longer
        prompt (none should come) takes the paged kernel."""
        self.max_tokens = max_tokens

    def applies(self, q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> bool:
        """Whether this step's attention can run on its own K/V (see the module docstring)."""
        if not self.enabled:
            return False
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or kv_cache.dtype != q.dtype:
            return False
        if self.max_tokens is not None and metadata.max_query_len > self.max_tokens:
            return False
        return fresh_long_prompts(metadata, self.min_tokens) and not torch.cuda.is_current_stream_capturing()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata,
               scale: float | None) -> torch.Tensor | None:
        """Causal attention of each prompt over itself: ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (any row
        stride) -> ``[T, Hq, D]``; None if cuDNN attention turns out not to be available (the caller then runs
        the paged kernel, and this object stops trying)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        starts = metadata.query_start_loc_cpu
        out = None
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                self._build_buckets(q, k, scale)
                for a, b in zip(starts, starts[1:]):
                    res = self._one_prompt(q[a:b], k[a:b], v[a:b], scale)  # [L, Hq, D]
                    if len(starts) == 2 and b - a == q.shape[0] and res.is_contiguous():
                        # cuDNN lays its output out as [Lp, H, D], so its first L rows are the answer: one
                        # prompt needs no copy (at 32k tokens the copy costs 0.4 ms a layer on an H100).
                        return res
                    if out is None:
                        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
                    out[a:b].copy_(res)
        except RuntimeError as err:  # no cuDNN attention for this device/build/shape: the paged kernel serves
            self._unavailable = True
            logger.warning("cuDNN attention is not available (%s); fresh prompts use the paged kernel", err)
            return None
        return out

    def _one_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """One prompt's rows at its bucket's length, in the packed layout; its first ``L`` output rows."""
        length, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
        padded = bucket_len(length)
        if padded != length or not _packed(q, k, v):
            buf = torch.empty(padded, hq + 2 * hkv, q.shape[2], dtype=q.dtype, device=q.device)
            buf[length:].zero_()  # finite, and masked out anyway: padded keys come after every real query
            buf[:length, :hq].copy_(q)
            buf[:length, hq:hq + hkv].copy_(k)
            buf[:length, hq + hkv:].copy_(v)
            q, k, v = buf[:, :hq], buf[:, hq:hq + hkv], buf[:, hq + hkv:]
        # [L, H, D] -> [1, H, L, D]: a view, the layout SDPA takes.
        qs, ks, vs = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
        return self._sdpa(qs, ks, vs, scale, hq // hkv)[0].transpose(0, 1)[:length]

    def _build_buckets(self, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
        """Build every bucket's graph for these heads, dtype and scale, once (all layers share them)."""
        signature = (q.shape[1], k.shape[1], q.shape[2], q.dtype, scale, q.device)
        if signature in self._built or self.max_tokens is None:
            return
        self._built.add(signature)
        start = time.perf_counter()
        lengths = buckets(self.min_tokens, self.max_tokens)
        hq, hkv, dim = q.shape[1], k.shape[1], q.shape[2]
        for length in lengths:
            buf = torch.zeros(length, hq + 2 * hkv, dim, dtype=q.dtype, device=q.device)
            self._one_prompt(buf[:, :hq], buf[:, hq:hq + hkv], buf[:, hq + hkv:], scale)
        if q.device.type == "cuda":
            torch.cuda.synchronize(q.device)
        logger.info("cuDNN prefill attention: built %d prompt-length buckets (%d-%d tokens) in %.1fs",
                    len(lengths), lengths[0] if lengths else 0, lengths[-1] if lengths else 0,
                    time.perf_counter() - start)

    def _sdpa(self, q, k, v, scale, group):
        if self._gqa_native:
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            except RuntimeError:
                self._gqa_native = False  # this build wants as many K/V heads as query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v have the strides of the packed ``[L, Hq + 2 Hkv, D]`` layout (a bucket's graph)."""
    row = (q.shape[1] + 2 * k.shape[1]) * q.shape[2]
    return all(t.stride() == (row, t.shape[2], 1) for t in (q, k, v))
