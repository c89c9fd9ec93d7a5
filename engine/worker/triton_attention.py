"""The Triton attention backend: one KV-cache write kernel and one paged-attention launch per layer.

Unlike the torch backend it never loops over chunks on the host and never reads the ``*_cpu`` lists, so a step
costs the same two launches whatever its mix of decodes and prefill chunks, and the decode step can be captured
in a CUDA graph: every launch grid follows from tensor shapes, and the host-side hints it reads
(``max_query_len``, ``max_seq_len``) only pick tile shapes and the split-KV factor, never correctness.
Opt-in (``PDSERVE_DENSE_PREFILL``), eager steps of fresh long prompts attend with cuDNN instead
(:mod:`~pdserve.engine.worker.dense_prefill`).
"""

from __future__ import annotations

import torch

from pdserve.engine.worker.attention import AttentionBackend, AttentionMetadata
from pdserve.engine.worker.dense_prefill import DensePrefill
from pdserve.kernels.attention import paged_attention
from pdserve.kernels.kv_cache import write_kv_cache
from pdserve.kernels.rotary import rotary_embedding_and_write_kv


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through :mod:`pdserve.kernels`, for float16/bfloat16/float32 or FP8 (e4m3) caches.

    Args:
        k_scale, v_scale: per-tensor dequantisation scales of an FP8 cache (stored value = real / scale);
            must stay 1.0 for other cache dtypes.
        num_kv_splits: force the split-KV factor; by default it is chosen from the batch shape. A CUDA-graph
            runner may pin it so that every replay of a captured batch size uses the same grid (it is already
            fixed for a fixed shape and ``max_seq_len`` hint).
    """

    name = "triton"
    triton_kernels = True

    def __init__(self, k_scale: float = 1.0, v_scale: float = 1.0, num_kv_splits: int | None = None) -> None:
        self.k_scale = k_scale
        self.v_scale = v_scale
        self.num_kv_splits = num_kv_splits
        self.dense_prefill = DensePrefill.from_env()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float | None = None) -> torch.Tensor:
        """Write ``k``/``v`` ``[T, Hkv, D]`` into ``kv_cache`` and attend: ``q [T, Hq, D] -> [T, Hq, D]``."""
        k_scale, v_scale = self._scales(kv_cache)
        write_kv_cache(k, v, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        return self._attend(q, k, v, kv_cache, metadata, scale, k_scale, v_scale)

    def forward_with_rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cos_sin: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                            scale: float | None = None) -> torch.Tensor:
        """Rotate ``q``/``k`` in place and write K/V in one launch (K is read once, not three times), then
        attend. Rows with a negative slot (CUDA-graph padding) are rotated but not written."""
        k_scale, v_scale = self._scales(kv_cache)
        rotary_embedding_and_write_kv(positions, q, k, v, cos_sin, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        return self._attend(q, k, v, kv_cache, metadata, scale, k_scale, v_scale)

    def _scales(self, kv_cache: torch.Tensor) -> tuple[float, float]:
        if kv_cache.dtype == torch.float8_e4m3fn:
            return self.k_scale, self.v_scale
        return 1.0, 1.0

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float | None, k_scale: float, v_scale: float) -> torch.Tensor:
        if self.dense_prefill.applies(q, kv_cache, metadata):
            out = self.dense_prefill.attend(q, k, v, metadata, scale)
            if out is not None:
                return out
        return paged_attention(
            q, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_tables, scale,
            k_scale=k_scale, v_scale=v_scale,
            max_query_len=metadata.max_query_len, max_seq_len=metadata.max_seq_len,
            num_kv_splits=self.num_kv_splits,
            # A mixed step's decodes get the decode tile shape (kernels/attention.py says why).
            separate_decodes=metadata.num_decodes > 0 or metadata.separate_decodes,
        )
