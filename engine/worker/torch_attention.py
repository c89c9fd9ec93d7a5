"""Pure-torch paged attention: the reference backend, and the one used on CPU.

Decode rows are batched into one SDPA call over their gathered (padded) K/V; prefill chunks run one SDPA call
each, attending over the cached prefix gathered from their block table plus the chunk itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.worker.attention import AttentionBackend, AttentionMetadata, write_kv


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype):
    """K and V of positions ``0 .. length - 1`` of one sequence: two ``[length, Hkv, D]`` tensors."""
    bs = kv_cache.shape[2]
    blocks = block_table[: (length + bs - 1) // bs]
    kv = kv_cache.index_select(1, blocks)  # [2, nblk, bs, Hkv, D]
    kv = kv.flatten(1, 2)[:, :length].to(dtype)  # [2, length, Hkv, D]
    return kv[0], kv[1]


class TorchAttentionBackend(AttentionBackend):
    """Correct for any mix of decode rows, fresh prefills and prefill chunks on top of a cached prefix."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float | None = None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        out = torch.empty_like(q)  # [T, Hq, D]
        nd = metadata.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, metadata, scale)
        qsl, ctx = metadata.query_start_loc_cpu, metadata.context_lens_cpu
        for i in range(nd, metadata.num_seqs):
            s, e = qsl[i], qsl[i + 1]
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], kv_cache, metadata.block_tables[i], ctx[i], scale)
        return out

    @staticmethod
    def _prefill(q, k, v, kv_cache, block_table, context_len: int, scale: float) -> torch.Tensor:
        """One chunk: ``q: [L, Hq, D]``, its own ``k, v: [L, Hkv, D]`` -> ``[L, Hq, D]``."""
        L, hq = q.shape[0], q.shape[1]
        if context_len > 0:
            # The prefix comes from the cache; the chunk's own K/V were just written there too.
            k, v = gather_kv(kv_cache, block_table, context_len + L, q.dtype)  # [S, Hkv, D]
        group = hq // k.shape[1]
        # Repeating K/V across the query group costs at most S x Hq x D, comparable to q itself here.
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        # 4-D inputs: with 3-D ones CPU SDPA falls back to the (~2x slower) math kernel instead of the flash one.
        qh, k, v = q.transpose(0, 1)[None], k[None], v[None]  # [1, Hq, L, D], [1, Hq, S, D]
        if context_len == 0:
            o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
        else:
            # Query row l sits at absolute position context_len + l and sees keys 0 .. context_len + l.
            key_pos = torch.arange(k.shape[2], device=q.device)
            q_pos = torch.arange(L, device=q.device) + context_len
            mask = key_pos[None, :] <= q_pos[:, None]  # [L, S]
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1)

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
        """``nd`` single-token rows at once: ``q: [nd, Hq, D]`` -> ``[nd, Hq, D]``."""
        nd, hq, d = q.shape
        bs, hkv = kv_cache.shape[2], kv_cache.shape[3]
        max_len = max(md.seq_lens_cpu[:nd])
        nblk = (max_len + bs - 1) // bs
        # index_select rather than kv_cache[:, table]: advanced indexing with int32 ids is ~15x slower on CPU.
        # K and V blocks are gathered as rows of one [2 * num_blocks, bs * Hkv * D] view (ids of V offset by
        # num_blocks): a dim-0 row gather is ~1.4x faster on CPU than index_select over dim 1.
        # (The cache is contiguous: write_kv relies on that too.)
        ids, nb = md.block_tables[:nd, :nblk].reshape(-1).long(), kv_cache.shape[1]
        kv = kv_cache.view(2 * nb, -1).index_select(0, torch.cat([ids, ids + nb]))  # [2 * nd*nblk, bs*Hkv*D]
        kv = kv.view(2, nd, nblk * bs, hkv, d)[:, :, :max_len].to(q.dtype)  # [2, nd, S, Hkv, D]
        k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [nd, Hkv, S, D]
        # The query heads of one KV group play the role of query "positions" (no causal mask is needed for a
        # decode row), so grouped-query attention needs no copy of K/V per query head.
        qg = q.view(nd, hkv, hq // hkv, d)  # [nd, Hkv, G, D]
        valid = torch.arange(max_len, device=q.device)[None, :] < md.seq_lens[:nd, None]  # [nd, S]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
        return o.reshape(nd, hq, d)
