"""SiLU-and-multiply of the gated MLP in one launch: ``silu(x[:, :I]) * x[:, I:]``.

Torch spends two kernels on it (``F.silu`` writes the activated gate, the multiply reads it back); this reads
``x`` once and writes the output once. Rounding copies torch's, so greedy outputs do not move when the switch
flips: torch computes ``g / (1 + exp(-g))`` in float32 with an IEEE division and the ``expf`` of libdevice, rounds
that to the activation dtype, then multiplies in float32 and rounds again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr,
                         LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if LIBDEVICE:  # torch's expf; Triton's tl.exp is the faster, less exact ex2.approx
        e = libdevice.exp(-gate)
    else:  # Triton's interpreter has no libdevice
        e = tl.exp(-gate)
    # div_rn, not '/': Triton's float32 division is approximate, torch's is IEEE.
    act = tl.math.div_rn(gate, 1.0 + e)
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` of shape ``[..., 2I]``; returns ``[..., I]`` in ``x``'s dtype.

    ``x`` needs a contiguous last dim; leading dims are flattened (they must be viewable as rows).
    """
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (gate and up halves), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {x.dtype}")
    inter = x.shape[-1] // 2
    x2 = x if x.dim() == 2 and x.stride(1) == 1 else x.reshape(-1, 2 * inter)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out_shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != out_shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_shape} {x.dtype} tensor")
    rows = x2.shape[0]
    if rows == 0 or inter == 0:
        return out
    out2 = out.view(rows, inter)
    block = min(_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        x2, out2, inter, x2.stride(0), out2.stride(0), BLOCK=block, LIBDEVICE=x.is_cuda, num_warps=4)
    return out
