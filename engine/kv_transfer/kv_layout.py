"""Moving blocks between the paged KV cache tensors and block payloads (the only torch code of the connectors).

The cache of layer ``l`` is ``[2, num_blocks, block_size, Hkv, D]``; a block payload is ``[L, 2, n, Hkv, D]``
(``n`` tokens, see :mod:`.block_format`). Gathering stages several blocks at once into a host tensor
``[num_blocks_to_save, L, 2, block_size, Hkv, D]`` whose row ``j`` is block ``j``'s payload (padded to a full
block), filled one layer at a time so that a GPU copies a layer out while it computes the next one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from pdserve.engine.kv_transfer.block_format import DTYPE_SIZES, KVDescriptor


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the descriptor's spelling)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise ValueError(f"KV cache dtype {dtype} cannot be transferred")
    return name


def model_fingerprint(hf_config: Any, model: str, load_format: str = "auto", seed: int = 0) -> str:
    """A short digest that two engines share only when they run the same model with the same weights.

    It covers the architecture and sizes (from the Hugging Face config) and the weights' identity: the model's
    name as given (so pods that mount the same checkpoint under different paths should be given the same
    ``--served-model-name``-like model string), plus the seed for random ``dummy`` weights.
    """
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps")
    parts = [f"{k}={getattr(hf_config, k, None)!r}" for k in keys] if hf_config is not None else []
    identity = f"{model}|{load_format}" + (f"|seed={seed}" if load_format == "dummy" else "")
    return hashlib.sha256("|".join([identity, *parts]).encode()).hexdigest()[:32]


def descriptor_for(kv_caches: Sequence[torch.Tensor], *, model_fingerprint: str, hash_algo: str, hash_seed: int,
                   tp_rank: int = 0, tp_size: int = 1) -> KVDescriptor:
    """The descriptor of an allocated cache (one ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer)."""
    first = kv_caches[0]
    if first.dim() != 5 or first.shape[0] != 2:
        raise ValueError(f"unexpected KV cache shape {tuple(first.shape)}; expected [2, blocks, block_size, "
                         f"kv_heads, head_dim]")
    _, _, block_size, heads, head_dim = first.shape
    return KVDescriptor(model_fingerprint=model_fingerprint, dtype=dtype_name(first.dtype), block_size=block_size,
                        num_layers=len(kv_caches), num_kv_heads=heads, head_dim=head_dim, hash_algo=hash_algo,
                        hash_seed=hash_seed, tp_rank=tp_rank, tp_size=tp_size)


def new_stage(num_blocks: int, kv_caches: Sequence[torch.Tensor]) -> torch.Tensor:
    """A host staging tensor for ``num_blocks`` whole blocks (pinned when the cache is on a GPU)."""
    _, _, bs, heads, dim = kv_caches[0].shape
    pin = kv_caches[0].is_cuda
    return torch.empty((num_blocks, len(kv_caches), 2, bs, heads, dim), dtype=kv_caches[0].dtype,
                       pin_memory=pin)


def stage_layer(stage: torch.Tensor, layer_idx: int, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` (on the cache's device) of one layer into ``stage[:, layer_idx]``."""
    src = kv_layer.index_select(1, block_ids) if kv_layer.element_size() > 1 else \
        kv_layer.view(torch.uint8).index_select(1, block_ids).view(kv_layer.dtype)  # no fp8 index kernels
    stage[:, layer_idx].copy_(src.transpose(0, 1), non_blocking=True)  # [2, n, bs, H, D] -> [n, 2, bs, H, D]


def gather_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> torch.Tensor:
    """Every layer of ``block_ids`` staged on the host: ``[len(block_ids), L, 2, block_size, Hkv, D]``."""
    stage = new_stage(len(block_ids), kv_caches)
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=kv_caches[0].device)
    for layer_idx, kv_layer in enumerate(kv_caches):
        stage_layer(stage, layer_idx, kv_layer, ids)
    if kv_caches[0].is_cuda:
        torch.cuda.current_stream(kv_caches[0].device).synchronize()
    return stage


def payload_view(stage_row: torch.Tensor, num_tokens: int) -> memoryview:
    """The payload bytes of one staged block ``[L, 2, block_size, H, D]`` holding ``num_tokens`` tokens."""
    t = stage_row[:, :, :num_tokens].contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def payload_tensor(payload: Any, desc: KVDescriptor, num_tokens: int) -> torch.Tensor:
    """A block payload (bytes-like) as ``[L, 2, num_tokens, Hkv, D]`` in the cache dtype, on the host."""
    view = memoryview(payload)
    if view.readonly:  # torch.frombuffer wants a writable buffer; one copy is cheaper than a warning per block
        view = memoryview(bytearray(view))
    raw = torch.frombuffer(view, dtype=torch.uint8)
    dtype = getattr(torch, desc.dtype)
    return raw.view(dtype).view(desc.num_layers, 2, num_tokens, desc.num_kv_heads, desc.head_dim)


def write_block(kv_caches: Sequence[torch.Tensor], block_id: int, payload: torch.Tensor) -> None:
    """Copy a payload ``[L, 2, n, H, D]`` into block ``block_id`` of every layer (its first ``n`` slots)."""
    n = payload.shape[2]
    src = payload.to(kv_caches[0].device, non_blocking=True)  # one host-to-device copy per block
    for layer_idx, kv_layer in enumerate(kv_caches):
        dst = kv_layer[:, block_id, :n]
        if kv_layer.element_size() == 1:
            dst.view(torch.uint8).copy_(src[layer_idx].view(torch.uint8))
        else:
            dst.copy_(src[layer_idx])


def synchronize(kv_caches: Sequence[torch.Tensor]) -> None:
    """Wait for copies into or out of a GPU cache issued by this thread."""
    if kv_caches and kv_caches[0].is_cuda:
        torch.cuda.current_stream(kv_caches[0].device).synchronize()
