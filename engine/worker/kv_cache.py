"""The paged KV cache tensors, and how many blocks fit in the memory budget.

Layout (fixed; connectors and the Triton backend rely on it): one tensor per layer of shape
``[2, num_blocks, block_size, num_kv_heads, head_dim]``, index 0 = K and 1 = V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one model's KV cache, independent of how many blocks it gets."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """All layers, K and V, of one block."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def kv_cache_spec(hf_config, block_size: int, model_dtype: torch.dtype, kv_cache_dtype: str = "auto") -> KVCacheSpec:
    """The cache shape of a HF config; ``kv_cache_dtype`` is ``"auto"`` (the model dtype) or ``"fp8_e4m3"``."""
    heads = hf_config.num_attention_heads
    if kv_cache_dtype == "auto":
        dtype = model_dtype
    elif kv_cache_dtype in _KV_DTYPES:
        dtype = _KV_DTYPES[kv_cache_dtype]
    else:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r} (choose auto or fp8_e4m3)")
    return KVCacheSpec(
        num_layers=hf_config.num_hidden_layers,
        block_size=block_size,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        dtype=dtype,
    )


def shard_kv_spec(spec: KVCacheSpec, hf_config, shard) -> KVCacheSpec:
    """The cache of one rank of a parallel engine: its KV heads (replicated ones count once per rank) of its
    pipeline stage's layers."""
    import dataclasses

    from pdserve.engine.models.parallel_layers import heads_per_rank

    _, kv_heads = heads_per_rank(hf_config.num_attention_heads, spec.num_kv_heads, shard.tp_size)
    start, end = shard.layer_range(spec.num_layers)
    return dataclasses.replace(spec, num_kv_heads=kv_heads, num_layers=end - start)


def num_blocks_for_bytes(spec: KVCacheSpec, budget_bytes: int) -> int:
    return max(0, int(budget_bytes) // spec.bytes_per_block)


def gpu_kv_cache_bytes(device: torch.device, gpu_memory_utilization: float) -> int:
    """Bytes left for the KV cache on ``device``, measured after the model is loaded and a profiling forward
    pass at the largest batch has run (so its peak activation memory is known).

    The engine may use ``total * gpu_memory_utilization``; from that come off the peak memory torch has
    allocated (weights + activations) and what is used outside torch's allocator (CUDA context, other
    processes).
    """
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    non_torch = max(0, total - free - reserved)
    return int(total * gpu_memory_utilization - peak - non_torch)


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
    """One zeroed ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer."""
    if num_blocks <= 0:
        raise ValueError("the KV cache budget leaves no room for a single block; raise the memory budget or "
                         "set cache num_blocks")
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
