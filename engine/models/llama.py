"""The Llama family (Llama 2/3/3.1/3.2, SmolLM, Mistral), and the base that Qwen2 and Qwen3 specialise.

Tokens are flattened over the step: ``T`` tokens, ``D`` hidden, ``Hq``/``Hkv`` query/KV heads of size ``Dh``.
Parameter names mirror Hugging Face's, except that q/k/v and gate/up are fused (``qkv_proj``, ``gate_up_proj``).

Parallelism (:class:`ModelShard`, built by the multi-process executor): with tensor parallelism the projections,
the embedding and the head are the sharded layers of :mod:`pdserve.engine.models.parallel_layers` and ``Hq``/``Hkv``
below are this rank's heads; with pipeline parallelism a stage builds only its layers (the others are
:class:`MissingLayer`), the first stage embeds, the last one norms and computes logits, and the stages in between
take and return the intermediate ``(hidden, residual)`` pair.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pdserve.engine.models.layers import (
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    default_weight_loader,
    rope_parameters,
)
from pdserve.engine.models.parallel_layers import (
    NO_SHARD,
    ModelShard,
    VocabParallelEmbedding,
    heads_per_rank,
    merged_column_parallel_linear,
    qkv_parallel_linear,
    row_parallel_linear,
)
from pdserve.engine.worker.attention import AttentionBackend, AttentionMetadata


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class MissingLayer(nn.Module):
    """A decoder layer another pipeline stage runs (keeps the layer indices of the checkpoint's names)."""


class LlamaAttention(nn.Module):
    def __init__(self, config, backend: AttentionBackend, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, shard: ModelShard = NO_SHARD) -> None:
        super().__init__()
        total_heads, total_kv_heads = config.num_attention_heads, kv_heads_of(config)
        self.num_heads, self.num_kv_heads = heads_per_rank(total_heads, total_kv_heads, shard.tp_size)
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = qkv_parallel_linear(config.hidden_size, self.head_dim, total_heads, total_kv_heads,
                                            qkv_bias, shard)
        self.o_proj = row_parallel_linear(total_heads * self.head_dim, config.hidden_size, o_bias, shard)
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
    def __init__(self, config, shard: ModelShard = NO_SHARD) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = merged_column_parallel_linear(
            config.hidden_size, {0: config.intermediate_size, 1: config.intermediate_size}, bias, shard)
        self.act = SiluAndMul()
        self.down_proj = row_parallel_linear(config.intermediate_size, config.hidden_size, bias, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # [T, D] -> [T, 2I] -> [T, I] -> [T, D]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, backend: AttentionBackend, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, shard: ModelShard = NO_SHARD) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, backend, rotary, qkv_bias, o_bias, qk_norm, shard)
        self.mlp = LlamaMLP(config, shard)
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
    def __init__(self, config, backend: AttentionBackend, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 shard: ModelShard = NO_SHARD) -> None:
        super().__init__()
        self.shard = shard
        self.start_layer, self.end_layer = shard.layer_range(config.num_hidden_layers)
        if shard.is_first_stage:
            self.embed_tokens = (Embedding(config.vocab_size, config.hidden_size) if shard.tp_size == 1
                                 else VocabParallelEmbedding(config.vocab_size, config.hidden_size, shard))
        rotary = RotaryEmbedding(head_dim_of(config), *rope_parameters(config),
                                 max_position=config.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend, rotary, qkv_bias, o_bias, qk_norm, shard)
            if self.start_layer <= i < self.end_layer else MissingLayer() for i in range(config.num_hidden_layers))
        if shard.is_last_stage:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # EAGLE-3 (engine/spec_decode): the inputs of these layers are kept in ``aux_hidden_states`` on every
        # forward pass; empty (the default) keeps the plain loop below untouched.
        self.aux_hidden_layers: tuple[int, ...] = ()
        self.aux_hidden_states: list[torch.Tensor] = []

    def forward(self, input_ids, positions, kv_caches, md, intermediate=None):
        """``kv_caches``: one per layer of this stage. A stage after the first takes ``intermediate``, a stage
        before the last returns it: the ``(x, residual)`` pair, each ``[T, D]``."""
        if self.aux_hidden_layers and self.shard.pp_size == 1:
            return self._forward_keeping_aux(input_ids, positions, kv_caches, md)
        if self.shard.pp_size == 1:  # the single-stage path, as it always was
            x = self.embed_tokens(input_ids)  # [T, D]
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                x, residual = layer(positions, x, residual, kv_cache, md)
            x, _ = self.norm(x, residual)
            return x
        x, residual = (self.embed_tokens(input_ids), None) if intermediate is None else intermediate
        local = self.layers[self.start_layer:self.end_layer]
        for layer, kv_cache in zip(local, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv_cache, md)
        if not self.shard.is_last_stage:
            return x, residual
        x, _ = self.norm(x, residual)
        return x

    def _forward_keeping_aux(self, input_ids, positions, kv_caches, md):
        """The single-stage forward, keeping the residual stream entering each layer of ``aux_hidden_layers``
        (``[T, D]`` each, in that order) in ``aux_hidden_states``."""
        wanted = self.aux_hidden_layers
        kept: dict[int, torch.Tensor] = {}
        x = self.embed_tokens(input_ids)
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i in wanted:  # a new tensor: the fused norm updates the residual stream in place later
                kept[i] = x.clone() if residual is None else x + residual
            x, residual = layer(positions, x, residual, kv_cache, md)
        self.aux_hidden_states = [kept[i] for i in wanted]
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

    def __init__(self, config, attn_backend: AttentionBackend, shard: ModelShard = NO_SHARD) -> None:
        super().__init__()
        self.config = config
        self.shard = shard
        self.model = LlamaModel(config, attn_backend, **self.attention_switches(config), shard=shard)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not shard.is_last_stage:
            self.lm_head = None
        elif self.tie_word_embeddings and shard.is_first_stage:
            self.lm_head = self.model.embed_tokens
        elif shard.tp_size == 1:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        else:
            self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, shard)
        if attn_backend.triton_kernels:  # the Triton norms, activation and skinny matmuls go with Triton attention
            for module in self.modules():
                if isinstance(module, (RMSNorm, SiluAndMul, Linear)):  # Linear covers FusedLinear
                    module.use_kernels = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate=None):
        """``input_ids, positions: [T]``; one KV cache per layer -> hidden states ``[T, D]`` (a pipeline stage
        before the last returns the intermediate pair instead, see :class:`LlamaModel`)."""
        if intermediate is None:
            return self.model(input_ids, positions, kv_caches, attn_metadata)
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [S, D]`` -> logits ``[S, V]`` in the model dtype (gathered over the TP ranks)."""
        if isinstance(self.lm_head, VocabParallelEmbedding):
            return self.lm_head.logits(hidden)
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
            name = self._stage_name(name)
            if name is None:
                continue  # another pipeline stage's tensor
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

    def _stage_name(self, name: str) -> str | None:
        """The parameter a checkpoint tensor fills on this pipeline stage, or None if another stage owns it.
        (With one stage, every name is kept as it is.)"""
        shard = self.shard
        if shard.pp_size == 1:
            return name
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            return name if self.model.start_layer <= index < self.model.end_layer else None
        if name.startswith("model.embed_tokens."):
            if shard.is_first_stage:
                return name
            # The last stage of a tied model keeps its own copy of the table as its head.
            return name.replace("model.embed_tokens.", "lm_head.") if (
                self.tie_word_embeddings and shard.is_last_stage) else None
        if name.startswith(("model.norm.", "lm_head.")):
            return name if shard.is_last_stage else None
        return name
