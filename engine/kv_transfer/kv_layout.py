"""Moving blocks between the paged KV cache tensors and block payloads (the only torch code of the connectors).

The cache of layer ``l`` is ``[2, num_blocks, block_size, Hkv, D]``; a block payload is ``[L, 2, n, Hkv, D]``
(``n`` tokens, see :mod:`.block_format`). Saving stages several blocks at once into a host tensor
``[L, 2, num_blocks_to_save, block_size, Hkv, D]`` (as bytes), filled one layer at a time so that a GPU copies a
layer out while it computes the next one; each block's payload is then gathered from it on the host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
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


def descriptor_for(kv_caches: Sequence[torch.Tensor], *, model_fingerprint: str, hash_algo: str, hash_seed_id: int,
                   tp_rank: int = 0, tp_size: int = 1) -> KVDescriptor:
    """The descriptor of an allocated cache (one ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer)."""
    first = kv_caches[0]
    if first.dim() != 5 or first.shape[0] != 2:
        raise ValueError(f"unexpected KV cache shape {tuple(first.shape)}; expected [2, blocks, block_size, "
                         f"kv_heads, head_dim]")
    _, _, block_size, heads, head_dim = first.shape
    return KVDescriptor(model_fingerprint=model_fingerprint, dtype=dtype_name(first.dtype), block_size=block_size,
                        num_layers=len(kv_caches), num_kv_heads=heads, head_dim=head_dim, hash_algo=hash_algo,
                        hash_seed_id=hash_seed_id, tp_rank=tp_rank, tp_size=tp_size)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view (last axis times the element size): one code path for every dtype, fp8 included."""
    return t.view(torch.uint8)


def new_stage(num_blocks: int, kv_caches: Sequence[torch.Tensor]) -> torch.Tensor:
    """A host staging tensor (bytes) for ``num_blocks`` whole blocks: ``[L, 2, n, block_size, Hkv, D * elem]``.

    Layer-major so that staging one layer is one gather into a contiguous slice; pinned for a GPU cache so the
    device-to-host copy is asynchronous.
    """
    _, _, bs, heads, dim = kv_caches[0].shape
    width = dim * kv_caches[0].element_size()
    return torch.empty((len(kv_caches), 2, num_blocks, bs, heads, width), dtype=torch.uint8,
                       pin_memory=kv_caches[0].is_cuda)


def stage_layer(stage: torch.Tensor, layer_idx: int, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` (a tensor on the cache's device) of one layer into ``stage[layer_idx]``."""
    if kv_layer.is_cuda:
        stage[layer_idx].copy_(as_bytes(kv_layer).index_select(1, block_ids), non_blocking=True)
    else:
        torch.index_select(as_bytes(kv_layer), 1, block_ids, out=stage[layer_idx])


def gather_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> torch.Tensor:
    """Every layer of ``block_ids`` staged on the host (see :func:`new_stage`)."""
    stage = new_stage(len(block_ids), kv_caches)
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=kv_caches[0].device)
    for layer_idx, kv_layer in enumerate(kv_caches):
        stage_layer(stage, layer_idx, kv_layer, ids)
    synchronize(kv_caches)
    return stage


def stage_segments(stage: torch.Tensor, row: int, num_tokens: int) -> list[memoryview]:
    """The payload ``[L, 2, num_tokens, H, D]`` of staged block ``row`` as its ``2 L`` contiguous pieces, in order.

    No copy: writers checksum and write the pieces as they are (``writev``); numpy views keep the work in the
    calling thread instead of torch's intra-op pool, which the forward pass is using.
    """
    arr = stage.numpy()
    return [memoryview(arr[layer, kv, row, :num_tokens]).cast("B")
            for layer in range(arr.shape[0]) for kv in range(2)]


def payload_from_stage(stage: torch.Tensor, row: int, num_tokens: int) -> bytes:
    """The payload of staged block ``row`` as one bytes object."""
    return b"".join(stage_segments(stage, row, num_tokens))


def payload_array(payload: Any, desc: KVDescriptor, num_tokens: int) -> np.ndarray:
    """A block payload (bytes-like) as a uint8 array ``[L, 2, num_tokens, Hkv, D * elem]`` (no copy)."""
    arr = np.frombuffer(payload, dtype=np.uint8)
    return arr.reshape(desc.num_layers, 2, num_tokens, desc.num_kv_heads, desc.head_dim * desc.element_size)


def write_block(kv_caches: Sequence[torch.Tensor], block_id: int, payload: np.ndarray) -> None:
    """Copy a payload array (see :func:`payload_array`) into the first slots of block ``block_id``, every layer."""
    write_blocks(kv_caches, [block_id], [payload])


def write_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], payloads: Sequence[np.ndarray],
                 first_head: int | None = None) -> None:
    """Copy several payloads into their blocks. On a GPU: one pinned staging tensor, one host-to-device copy and
    one ``index_copy_`` per layer for the whole batch (a partial block's unused slots get stale bytes, which is
    harmless: they belong to the same request and are written when their tokens are computed).

    ``first_head``: the payloads hold only some of the cache's heads (a tensor-parallel peer's shard, see
    :mod:`.head_shards`); they go to heads ``[first_head, first_head + their head count)``, the others untouched.
    """
    if first_head is not None:
        _write_heads(kv_caches, block_ids, payloads, first_head)
        return
    if not kv_caches[0].is_cuda:
        for block_id, payload in zip(block_ids, payloads):
            n = payload.shape[2]
            for layer_idx, kv_layer in enumerate(kv_caches):
                as_bytes(kv_layer).numpy()[:, block_id, :n] = payload[layer_idx]
        return
    stage = new_stage(len(block_ids), kv_caches)
    host = stage.numpy()
    for j, payload in enumerate(payloads):
        host[:, :, j, :payload.shape[2]] = payload
    device = kv_caches[0].device
    src = stage.to(device, non_blocking=True)
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    for layer_idx, kv_layer in enumerate(kv_caches):
        as_bytes(kv_layer).index_copy_(1, ids, src[layer_idx])


def _write_heads(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], payloads: Sequence[np.ndarray],
                 first_head: int) -> None:
    """Payloads ``[L, 2, n, h, D * elem]`` into heads ``[first_head, first_head + h)`` of their blocks."""
    for block_id, payload in zip(block_ids, payloads):
        n, h = payload.shape[2], payload.shape[3]
        for layer_idx, kv_layer in enumerate(kv_caches):
            if kv_layer.is_cuda:
                src = torch.from_numpy(np.ascontiguousarray(payload[layer_idx])).to(kv_layer.device)
                as_bytes(kv_layer)[:, block_id, :n, first_head:first_head + h] = src
            else:
                as_bytes(kv_layer).numpy()[:, block_id, :n, first_head:first_head + h] = payload[layer_idx]


def synchronize(kv_caches: Sequence[torch.Tensor]) -> None:
    """Wait for copies into or out of a GPU cache issued by this thread."""
    if kv_caches and kv_caches[0].is_cuda:
        torch.cuda.current_stream(kv_caches[0].device).synchronize()


def device_fence(kv_caches: Sequence[torch.Tensor]) -> Any:
    """A CUDA event on the calling thread's current stream, marking the device work queued so far (None for a
    CPU cache). A load started by the engine's thread takes one: with asynchronous scheduling a step may still be
    running that writes into blocks freed since (the late row of a request that stopped, an aborted one), and
    the load's copies into those blocks, issued from another thread or stream, must come after it."""
    if not kv_caches or not kv_caches[0].is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(kv_caches[0].device))
    return event


def wait_fence(fence: Any, kv_caches: Sequence[torch.Tensor]) -> None:
    """Order the copies the calling thread queues next into ``kv_caches`` (on its current stream of the cache's
    device) after ``fence`` (see :func:`device_fence`); no-op for None. The host does not wait."""
    if fence is not None:
        torch.cuda.current_stream(kv_caches[0].device).wait_event(fence)
