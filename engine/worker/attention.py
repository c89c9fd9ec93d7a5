"""The attention backend interface and the metadata of one flattened (varlen) step.

A step packs every scheduled chunk's tokens into one ``[T, ...]`` batch: decode rows (one token each) first, then
prefill chunks. Chunk ``i`` owns token rows ``query_start_loc[i] : query_start_loc[i + 1]`` at absolute positions
``context_lens[i] .. seq_lens[i] - 1``; its keys are every position ``< seq_lens[i]`` of its own sequence::

    sequence i:  | cached prefix (context_lens[i]) | this chunk (query_lens[i]) |
                 0                                                     seq_lens[i]
    token row t of chunk i attends to keys 0 .. context_lens[i] + (t - query_start_loc[i])

KV cache layout (fixed, shared with connectors and the Triton backend): one tensor per layer of shape
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0 = K, 1 = V); token ``p`` of a sequence lives in
slot ``block_table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each token of the flattened step goes and what it attends to.

    Tensors live on the model's device; the ``*_cpu`` lists mirror the small per-chunk values so that a backend
    can loop over chunks without a device sync.
    """

    num_tokens: int  # T
    query_start_loc: torch.Tensor  # [B + 1] int32: chunk i owns rows query_start_loc[i]:query_start_loc[i+1]
    seq_lens: torch.Tensor  # [B] int32: context incl. this chunk
    context_lens: torch.Tensor  # [B] int32: tokens already in the cache before this chunk (= start_pos)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    max_query_len: int
    max_seq_len: int
    num_decodes: int  # leading chunks with exactly one query token
    logits_indices: torch.Tensor  # [S] int64: rows whose hidden state becomes a logits row
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    context_lens_cpu: list[int]
    # One-token sequences may sit among prompt chunks anywhere in the batch though ``num_decodes`` is 0: a
    # mixed-step CUDA graph, whose mix is data. The Triton backend then gives them a launch of their own.
    separate_decodes: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Paged causal attention over the KV cache of one layer.

    Implementations must accept any head count with ``Hq % Hkv == 0`` (grouped-query attention), chunks that
    continue a cached prefix, and decode rows, all mixed in one step.
    """

    name: str = "abstract"
    # True when the backend runs Triton kernels: the model then also uses the fused Triton norm and the fused
    # rotary + KV-write kernel (:meth:`forward_with_rotary`), which run wherever this backend's kernels run.
    triton_kernels: bool = False

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float | None = None) -> torch.Tensor:
        """Write ``k``/``v`` into their slots of ``kv_cache``, then attend causally over each sequence.

        ``q: [T, Hq, D]``, ``k, v: [T, Hkv, D]``, ``kv_cache: [2, num_blocks, block_size, Hkv, D]``;
        ``scale`` defaults to ``D ** -0.5``. Returns ``[T, Hq, D]`` in ``q``'s dtype.
        """

    def forward_with_rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cos_sin: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                            scale: float | None = None) -> torch.Tensor:
        """Rotate ``q``/``k`` in place (neox style, ``cos_sin: [max_position, D]`` indexed by ``positions: [T]``),
        then as :meth:`forward`. Only backends with ``triton_kernels`` implement it."""
        raise NotImplementedError(f"the {self.name} backend does not fuse the rotary embedding")


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new K/V rows at ``slot_mapping`` (``[T]``), casting to the cache dtype (e.g. fp8)."""
    _, nb, bs, h, d = kv_cache.shape
    for i, x in enumerate((k, v)):
        flat = kv_cache[i].view(nb * bs, h, d)
        x = x.to(kv_cache.dtype)
        if kv_cache.element_size() == 1:
            # index_copy_ has no float8 kernels; the bytes are the same through a uint8 view.
            flat, x = flat.view(torch.uint8), x.view(torch.uint8)
        flat.index_copy_(0, slot_mapping, x)


def get_attention_backend(name: str, device: torch.device, head_dim: int | None = None,
                          block_size: int | None = None) -> AttentionBackend:
    """Pick a backend: ``"torch"``, ``"triton"``, or ``"auto"``: Triton on CUDA when it imports and supports the
    shapes (power-of-two ``head_dim >= 16`` and ``block_size``), else torch."""
    from pdserve.engine.worker.torch_attention import TorchAttentionBackend

    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown attention backend {name!r} (choose auto, torch or triton)")
    if name == "torch":
        return TorchAttentionBackend()
    if name == "auto":
        pow2 = all(x is None or (x & (x - 1) == 0) for x in (head_dim, block_size))
        if device.type != "cuda" or not pow2 or (head_dim is not None and head_dim < 16):
            return TorchAttentionBackend()
    try:
        from pdserve.engine.worker.triton_attention import TritonAttentionBackend
    except ImportError as e:
        if name == "triton":
            raise ValueError(f"the triton attention backend is not available: {e}") from e
        return TorchAttentionBackend()
    return TritonAttentionBackend()
