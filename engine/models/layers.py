"""Building blocks shared by the decoder models: norms, rotary embedding, fused linears, attention.

Tensors are flattened over the tokens of a step (no batch dimension): ``T`` tokens, ``D`` hidden size.
Parameters are created with ``torch.empty`` under the caller's device and default-dtype context (see
:func:`pdserve.engine.model_loader.load_model`), so building an 8B model never spends time on a throwaway init.

Fused projections (``qkv_proj``, ``gate_up_proj``) give their parameters a ``weight_loader(param, tensor,
shard_id)`` that copies a checkpoint's separate ``q_proj`` / ``k_proj`` / ... tensor into its rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Copy a whole checkpoint tensor into ``param`` (shapes must match exactly)."""
    loaded = full_tensor(loaded)
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter of shape "
                         f"{tuple(param.shape)}")
    param.data.copy_(loaded)


def full_tensor(loaded: Any) -> torch.Tensor:
    """A checkpoint tensor, read whole if the loader handed a lazy slice (tensor-parallel loading does, see
    :class:`pdserve.engine.model_loader.weights.LazyTensor`)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.full()


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, then scaled in the input dtype (as transformers does).

    With ``use_kernels`` (set by the model when its attention backend runs Triton) it runs the fused Triton
    kernel instead: one launch that reads ``x`` and ``residual`` once, where torch needs five or more.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.use_kernels = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``x: [..., D]``. With ``residual``: adds it first and returns ``(normed, new_residual)``."""
        if self.use_kernels:
            from pdserve.kernels.norm import rms_norm

            # The kernel updates ``residual`` in place to x + residual: it is the new residual stream.
            out = rms_norm(x, self.weight, self.eps, residual=residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        return out if residual is None else (out, residual)


def rope_parameters(config) -> tuple[float, dict[str, Any]]:
    """``(theta, scaling)`` from a HF config; transformers 5 moved both into ``config.rope_parameters``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), dict(params)
    theta = float(getattr(config, "rope_theta", 10000.0))
    return theta, dict(getattr(config, "rope_scaling", None) or {})


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by ``factor``, short ones kept,
    a smooth blend in between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves), as Hugging Face Llama/Qwen apply it.

    cos/sin are computed per step from the positions in float32 (cheap: ``[T, head_dim / 2]``) rather than
    cached for the whole context, which for 128k-context models would be a large buffer.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any], max_position: int = 0) -> None:
        super().__init__()
        self.max_position = max_position
        self._cos_sin: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        # Computed on the CPU, as transformers does, so every device gets bit-identical frequencies.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (theta ** exponents)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device(), torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """``positions: [T]``, ``q: [T, Hq, Dh]``, ``k: [T, Hkv, Dh]`` -> rotated ``(q, k)``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, Dh]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def cos_sin_cache(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``[max_position, Dh]`` table of the Triton rotary kernel (cos half, then sin half), built on
        first use and kept: per step it saves the cos/sin launches the torch path runs.

        Entries are computed exactly as :meth:`forward` computes them (float32, then rounded to ``dtype``), so
        both paths rotate by the same values.
        """
        key = (dtype, self.inv_freq.device)
        table = self._cos_sin.get(key)
        if table is None:
            if self.max_position <= 0:
                raise ValueError("this rotary embedding was built without max_position; it has no table")
            positions = torch.arange(self.max_position, device=self.inv_freq.device)
            freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [P, Dh/2]
            table = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)  # [P, Dh]
            self._cos_sin[key] = table
        return table


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with uninitialised parameters (the loader fills them).

    With ``use_kernels`` (set by the model when its attention backend runs Triton) a decode-sized input -- a few
    rows, bf16/fp16 on CUDA -- goes to the Triton skinny matmul, which streams the weight faster than cuBLAS
    does for these shapes; :func:`pdserve.kernels.skinny.prefers_skinny` holds the measured rule.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.use_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and _skinny_fits(x, self.weight):
            from pdserve.kernels.skinny import skinny_linear

            return skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _skinny_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x [M, K] @ weight^T`` should take the skinny kernel (checked per call: M is the step's tokens)."""
    if x.dim() != 2 or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or x.dtype != weight.dtype:
        return False
    from pdserve.kernels.skinny import prefers_skinny

    return prefers_skinny(x.shape[0], weight.shape[0], weight.shape[1])


class FusedLinear(Linear):
    """Several projections of the same input stacked along the output dim (``qkv_proj``, ``gate_up_proj``).

    ``shards`` maps a shard id (``"q"``, ``0``, ...) to its output width; one matmul replaces several and the
    loader writes each checkpoint tensor into its rows.
    """

    def __init__(self, in_features: int, shards: dict[Any, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias)
        self.offsets: dict[Any, tuple[int, int]] = {}
        start = 0
        for shard_id, width in shards.items():
            self.offsets[shard_id] = (start, width)
            start += width
        for p in self.parameters():
            # A partial over the offsets, not a bound method: a parameter pointing back at its module would make
            # a reference cycle that keeps a freed model's GPU memory alive until the garbage collector runs.
            p.weight_loader = functools.partial(_load_shard, dict(self.offsets))


def _load_shard(offsets: dict[Any, tuple[int, int]], param: nn.Parameter, loaded: torch.Tensor,
                shard_id: Any) -> None:
    start, width = offsets[shard_id]
    dest = param.data.narrow(0, start, width)
    loaded = full_tensor(loaded)
    if dest.shape != loaded.shape:
        raise ValueError(f"shard {shard_id!r}: checkpoint shape {tuple(loaded.shape)} != {tuple(dest.shape)}")
    dest.copy_(loaded)


class Embedding(nn.Module):
    """Token embedding table ``[V, D]``; also serves as the output head when embeddings are tied."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # [T] -> [T, D]


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` over a fused ``[T, 2I]`` input.

    With ``use_kernels`` (set by the model, as for :class:`RMSNorm`) it runs one Triton kernel instead of torch's
    two, rounding exactly as torch does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.use_kernels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            from pdserve.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
