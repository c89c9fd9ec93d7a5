"""Applying a structured-output token bitmask to a batch of logits on the device.

The bitmask is ``[S, W]`` int32 with ``W = ceil(V / 32)``: bit ``v % 32`` of word ``v // 32`` set means token ``v``
is allowed. Unconstrained rows are all ones (-1). Masked logits become ``-inf``.

On CUDA this is xgrammar's kernel (one launch for the batch); elsewhere :func:`apply_token_bitmask_reference`,
pure torch, which the tests compare the kernel against. Neither waits for the device.
"""

from __future__ import annotations

import torch

_BITS = torch.arange(32, dtype=torch.int32)


def small_bitmask_to(bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU bitmask on ``device``; on CUDA through pinned memory and a non-blocking copy (no host sync)."""
    if device.type != "cuda":
        return bitmask.to(device)
    return bitmask.pin_memory().to(device, non_blocking=True)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[S, W]`` int32 words -> ``[S, vocab_size]`` bool (True: allowed)."""
    bits = _BITS.to(bitmask.device)
    # x: [S, W, 32] -> [S, W * 32]; the arithmetic shift of a negative word keeps its high bits, & 1 reads one.
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool()
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size]


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits[s, v] = -inf`` where the bit of ``v`` in row ``s`` is clear (pure torch)."""
    s, v = logits.shape
    assert bitmask.dim() == 2 and bitmask.shape[0] == s and bitmask.shape[1] * 32 >= v, (logits.shape, bitmask.shape)
    assert bitmask.dtype == torch.int32, bitmask.dtype
    logits.masked_fill_(~unpack_bitmask(bitmask, v), float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place, on the logits' device; ``bitmask`` must already be there (see :func:`small_bitmask_to`)."""
    if logits.device.type == "cuda":
        import xgrammar as xgr

        assert bitmask.shape[0] == logits.shape[0] and bitmask.dtype == torch.int32, bitmask.shape
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])
        return
    apply_token_bitmask_reference(logits, bitmask)
