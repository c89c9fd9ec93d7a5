"""Hardware ceilings measured in the same run as a benchmark, and the model's bytes and FLOPs per step.

The decode roofline share is (bytes a step must read: weights + live KV) / step time / measured copy bandwidth;
a share of 1.0 means the step ran at the speed of memory. Copy bandwidth counts read + write bytes, like
``cudaMemcpy`` device-to-device benchmarks.
"""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device memory copy bandwidth in bytes/s (read + write)."""
    if device.type != "cuda":
        nbytes, iters = 1 << 27, 5
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - start)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                         iters: int = 20) -> float:
    """Dense matmul throughput in FLOP/s (the practical peak MFU is measured against)."""
    if device.type != "cuda":
        n, iters, dtype = 1024, 3, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def model_shape(hf_config) -> dict[str, int]:
    c = hf_config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return dict(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                kv_heads=getattr(c, "num_key_value_heads", heads), head_dim=head_dim, vocab=c.vocab_size)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters (a tied embedding / LM head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def _embedding_and_head(model: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The input embedding table and the LM head weight of a causal LM (ours or transformers')."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    return (getattr(emb, "weight", None), getattr(head, "weight", None))


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: every parameter once, except an input embedding table that is not
    also the LM head (the lookup reads a few rows of it, not the table)."""
    total = weight_bytes(model)
    emb, head = _embedding_and_head(model)
    if emb is not None and head is not None and emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """``(per-token params, LM-head params)``: the parameters that multiply every prompt token (all but the
    embedding table and the LM head), and the LM head's, which a prefill applies to its last token only."""
    emb, head = _embedding_and_head(model)
    skip = {t.data_ptr() for t in (emb, head) if t is not None}
    seen, per_token = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or p.data_ptr() in skip:
            continue
        seen.add(p.data_ptr())
        per_token += p.numel()
    return per_token, (head.numel() if head is not None else 0)


def kv_bytes_per_token(hf_config, kv_dtype_bytes: int) -> int:
    s = model_shape(hf_config)
    return 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * kv_dtype_bytes


def decode_step_bytes(weights: int, hf_config, kv_dtype_bytes: int, total_context: int) -> int:
    """Bytes one decode step must read: ``weights`` (see :func:`decode_weight_bytes`) plus the K and V of every
    live context token. Activations are left out: at decode they are a rounding error next to these."""
    return weights + kv_bytes_per_token(hf_config, kv_dtype_bytes) * total_context


def prefill_flops(per_token_params: int, head_params: int, hf_config, prompt_len: int) -> float:
    """Matmul FLOPs of a prefill: 2 * params * tokens for the layers, the LM head on the last token, and causal
    attention (QK^T and PV over half the square)."""
    s = model_shape(hf_config)
    attn = 2 * 2 * s["layers"] * s["heads"] * s["head_dim"] * prompt_len * prompt_len / 2
    return 2.0 * per_token_params * prompt_len + 2.0 * head_params + attn
