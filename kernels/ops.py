"""The public kernels of pdserve.kernels, importable from one place: Triton kernels, each beside a pure-torch
reference (``pdserve.kernels.reference``).

Public kernels (all take and return torch tensors; see each docstring for the contract):

* ``paged_attention`` -- varlen causal attention over the paged KV cache (prefill, chunked prefill, decode)
* ``write_kv_cache`` -- scatter K/V into cache slots (FP8-quantising when the cache is float8_e4m3fn)
* ``rotary_embedding`` / ``rotary_embedding_and_write_kv`` -- neox RoPE, alone or fused with the cache write
* ``rms_norm`` / ``fused_add_rms_norm`` -- RMSNorm, optionally with the residual add
* ``silu_and_mul`` -- the gated MLP's ``silu(gate) * up`` in one launch
* ``skinny_linear`` -- ``x W^T`` for a few rows of ``x`` (decode), streaming the weight

Names resolve lazily so that ``pdserve.kernels.reference`` (and code that only needs it) works without Triton.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter; the variable must be
set before this package's kernel modules are first imported.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "paged_attention": "attention",
    "AttentionConfig": "attention",
    "write_kv_cache": "kv_cache",
    "rotary_embedding": "rotary",
    "rotary_embedding_and_write_kv": "rotary",
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "silu_and_mul": "activation",
    "skinny_linear": "skinny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pdserve.kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
