"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

Fused, a layer boundary reads ``x`` and ``residual`` once and writes the new residual and the normed
activations once; unfused it would also write and re-read the sum. One program normalises one row, whole
(hidden sizes up to 16k fit in registers), accumulating in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the activation dtype before normalising: the residual stream is stored that way,
        # so the next layer sees exactly what this one normalised.
        h = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        h = h.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, h, mask=mask)
        x = h
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Round the normalised value to the activation dtype before the weight multiply, as transformers does,
    # so greedy outputs match it bit for bit.
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    if t.shape[-1] != n:
        raise ValueError(f"{name} has last dim {t.shape[-1]}, expected {n}")
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    return t.reshape(-1, n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``rmsnorm(x [+ residual]) * weight`` over the last dim; returns the normed tensor.

    With ``residual`` (same shape and dtype as ``x``) it is updated in place to ``x + residual`` first, which
    is what the next layer adds onto. ``x`` may be any shape ``[..., H]``; 2-D row-strided views are used
    as they are, anything else must be reshapeable without a copy when ``residual`` is given.
    """
    n = weight.shape[0]
    if weight.dim() != 1 or x.shape[-1] != n:
        raise ValueError(f"weight must be [H] matching x's last dim; got {tuple(weight.shape)}, {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {x.dtype}")
    x2 = _as_rows(x, "x", n)
    res2 = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x: {tuple(residual.shape)} {residual.dtype}")
        if not (residual.dim() == 2 and residual.stride(1) == 1) and not residual.is_contiguous():
            raise ValueError("residual must be viewable as rows without a copy (it is updated in place)")
        res2 = _as_rows(residual, "residual", n)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} tensor")
    out2 = out.view(-1, n)
    rows = x2.shape[0]
    if rows == 0:
        return out
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x2, res2 if res2 is not None else x2, weight, out2,
        x2.stride(0), res2.stride(0) if res2 is not None else 0, out2.stride(0), n, eps,
        BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 256)),
    )
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """``residual += x`` (in place) and return ``rmsnorm(residual) * weight``."""
    return rms_norm(x, weight, eps, residual=residual)
