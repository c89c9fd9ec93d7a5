"""Shared-memory budgets of Triton launches: the device's per-block limit and the fitting of a tuned tile shape.

Tile shapes are tuned in bf16 on an H100 / H200 (227 KiB of shared memory per block). The same tiles in float32
need twice the bytes and can exceed the limit (Triton then refuses the launch: "out of resource: shared
memory"), so each kernel estimates its tiles' bytes from the shapes, stages and element sizes, and shrinks the
tuned shape only where the estimate exceeds the device's limit: bf16 launches on those GPUs keep their tuned
tiles.
"""

from __future__ import annotations

import functools

import torch

# Without a CUDA device to ask (the interpreter, tests): the opt-in limit of the smallest current GPUs
# (sm_86 / sm_89: 99 KiB); H100 / H200 allow 227 KiB.
DEFAULT_LIMIT_BYTES = 99 * 1024
# Left for what the estimates do not count (barriers, reduction scratch, layout conversions).
SLACK_BYTES = 4 * 1024


@functools.lru_cache(maxsize=None)
def _cuda_limit(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def shared_memory_limit(device: torch.device | None) -> int:
    """Bytes of shared memory one program (block) may use on ``device``: the CUDA device's opt-in limit, else
    :data:`DEFAULT_LIMIT_BYTES`."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return _cuda_limit(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_LIMIT_BYTES


def pipelined_kv_tiles(num_stages: int) -> int:
    """Shared-memory copies of the K and V tiles (together) in a loop of two dependent ``tl.dot``s (attention)
    pipelined over ``num_stages``: an upper bound of the two ways Triton's pipeliner buffers them, ``num_stages
    - 1`` copies of each, or ``num_stages`` of K and one of V. Both give 4 at 3 stages, which with the query
    tile is the 321 KiB Triton asked for the float32 prefill tile (128 x 128 keys and queries, head_dim 128)."""
    return max(2 * (num_stages - 1), num_stages + 1)


def pipelined_tiles(num_stages: int) -> int:
    """Shared-memory copies of each operand tile of a single pipelined ``tl.dot`` (a matmul loop): at most
    ``num_stages``."""
    return max(1, num_stages)
