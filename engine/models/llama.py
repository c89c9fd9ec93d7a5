"""The Llama family (Llama 2/3/3.1/3.2, SmolLM, Mistral), and the base that Qwen2 and Qwen3 specialise.

Tokens are flattened over the step: ``T`` tokens, ``D`` hidden, ``Hq``/``Hkv`` query/KV heads of size ``Dh``.
Parameter names mirror Hugging Face's, except that q/k/v and gate/up are fused (``qkv_proj``, ``gate_up_proj``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pdserve.engine.models.layers import (
    Embedding,
    FusedLinear,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    default_weight_loader,
    rope_parameters,
)
from pdserve.engine.worker.attention import AttentionBackend, AttentionMetadata


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, backend: AttentionBackend, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=o_bias)
        self.split = (q_size, kv_size, kv_size)
        # Qwen3 normalises each query/key head before the rotary embedding.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary  # shared by all layers: one cos/sin table for the Triton path
        self.backend = backend
        self.scale = self.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)  # [T, Hq*Dh], [T, Hkv*Dh] x 2
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.backend.triton_kernels:
            # One launch rotates q and k in place and writes the rotated K and V into the cache.
            cos_sin = self.rotary.cos_sin_cache(q.dtype)  # [max_position, Dh]
            o = self.backend.forward_with_rotary(positions, q, k, v, cos_sin, kv_cache, md, scale=self.scale)
        else:
            q, k = self.rotary(positions, q, k)
            o = self.backend.forward(q, k, v, kv_cache, md, scale=self.scale)  # [T, Hq, Dh]
        return self.o_proj(o.reshape(T, -1))  # [T, D]


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = FusedLinear(config.hidden_size, {0: config.intermediate_size,
                                                             1: config.intermediate_size}, bias=bias)
        self.act = SiluAndMul()
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # [T, D] -> [T, 2I] -> [T, I] -> [T, D]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, backend: AttentionBackend, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, backend, rotary, qkv_bias, o_bias, qk_norm)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, md):
        """Pre-norm block. The residual add is folded into the next norm: returns ``(x, residual)``, each
        ``[T, D]``, whose sum is this layer's output."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, md)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, backend: AttentionBackend, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(head_dim_of(config), *rope_parameters(config),
                                 max_position=config.max_position_embeddings)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend, rotary, qkv_bias, o_bias, qk_norm)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, md):
        x = self.embed_tokens(input_ids)  # [T, D]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv_cache, md)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. Subclasses flip the three switches below (Qwen2: q/k/v bias; Qwen3: per-head q/k norm)."""

    # (fused parameter, checkpoint name, shard id)
    stacked_params = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    @classmethod
    def attention_switches(cls, config) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}

    def __init__(self, config, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, attn_backend, **self.attention_switches(config))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (self.model.embed_tokens if self.tie_word_embeddings
                        else Linear(config.hidden_size, config.vocab_size))
        if attn_backend.triton_kernels:  # the Triton norms, activation and skinny matmuls go with Triton attention
            for module in self.modules():
                if isinstance(module, (RMSNorm, SiluAndMul, Linear)):  # Linear covers FusedLinear
                    module.use_kernels = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """``input_ids, positions: [T]``; one KV cache per layer -> hidden states ``[T, D]``."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [S, D]`` -> logits ``[S, V]`` in the model dtype."""
        return torch.nn.functional.linear(hidden, self.lm_head.weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the parameters; returns the names of the parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue  # recomputed, never trained
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # some tied checkpoints still store a copy
            for fused, part, shard in self.stacked_params:
                if f".{part}." in name:
                    target, shard_id = name.replace(f".{part}.", f".{fused}."), shard
                    break
            else:
                target, shard_id = name, None
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
            loaded.add(target)
        return loaded
