"""A trainable EAGLE-1 head: the same function as :class:`~pdserve.engine.spec_decode.eagle_head.EagleHead`
(version 1), written with plain dense causal attention so autograd can run through it, and parameters named as
the published checkpoints name them (``fc.*``, ``layers.0.*``), so :meth:`EagleTrainHead.checkpoint` is what the
engine loads. ``scripts/train_eagle_head.py`` trains one; a test checks both implementations agree.

Shapes: ``B`` sequences of ``T`` positions (right-padded), ``D`` hidden. Position ``i`` reads the target's hidden
state ``h_i`` and the embedding of token ``x_{i+1}``; its output is trained to be ``h_{i+1}`` (regression) and to
give the target's next-token distribution through the target's ``lm_head`` (classification), as EAGLE does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.models.layers import RMSNorm, RotaryEmbedding, rope_parameters
from pdserve.engine.models.llama import head_dim_of, kv_heads_of


class EagleTrainHead(nn.Module):
    """One decoder layer without input norm after ``fc([embedding, hidden])``; ``config``: the target's."""

    def __init__(self, config) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.num_kv_heads = config.num_attention_heads, kv_heads_of(config)
        self.head_dim = head_dim_of(config)
        self.fc = nn.Linear(2 * d, d, bias=True)
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        nn.init.ones_(self.post_attention_layernorm.weight)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, *rope_parameters(config))
        self.config = config

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``embeds``: embeddings of ``x_{i+1}``, ``hidden``: ``h_i``, both ``[B, T, D]`` -> outputs ``[B, T, D]``."""
        x = self.fc(torch.cat((embeds, hidden), dim=-1))
        q, k, v = self._qkv(x)
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def forward_two_steps(self, embeds: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first pass (:meth:`forward`), and a second one that sees what the head sees at its second guess:
        at position ``i`` its input hidden state is the first pass's output at ``i - 1`` (its own prediction of
        ``h_i``), while it attends to the first pass's keys and values of the positions before ``i`` (computed
        from the target's features, as the head's cache holds them) and to its own at ``i``. Both passes have the
        same targets; the second's row 0 has no previous output (leave it out of the loss)."""
        B, T, D = hidden.shape
        x1 = self.fc(torch.cat((embeds, hidden), dim=-1))
        q1, k1, v1 = self._qkv(x1)
        out1 = self._finish(x1, F.scaled_dot_product_attention(q1, k1, v1, is_causal=True))
        prev = torch.cat((out1.new_zeros(B, 1, D), out1[:, :-1]), dim=1)
        x2 = self.fc(torch.cat((embeds, prev), dim=-1))
        q2, k2, v2 = self._qkv(x2)
        scale = self.head_dim ** -0.5
        earlier = (q2 @ k1.transpose(-1, -2)) * scale  # [B, H, T, T]: row i attends to pass-1 keys j < i
        strictly_before = torch.ones(T, T, dtype=torch.bool, device=x2.device).tril(-1)
        earlier = earlier.masked_fill(~strictly_before, float("-inf"))
        itself = (q2 * k2).sum(-1, keepdim=True) * scale  # [B, H, T, 1]
        weights = torch.softmax(torch.cat((earlier, itself), dim=-1).float(), dim=-1).to(q2.dtype)
        o2 = weights[..., :T] @ v1 + weights[..., T:] * v2
        return out1, self._finish(x2, o2)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, keys and values ``[B, H, T, Dh]`` (keys and values repeated over the query groups)."""
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).repeat(B)
        q = self.q_proj(x).view(B * T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B * T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Attention output ``o [B, H, T, Dh]`` through ``o_proj``, the residual and the MLP -> ``[B, T, D]``."""
        B, _, T, _ = o.shape
        h = x + self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        n = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))

    def checkpoint(self, dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, config.json fields)`` in the published EAGLE-1 layout (no embedding, no lm_head: the
        engine shares the target's)."""
        names = {"fc.weight": self.fc.weight, "fc.bias": self.fc.bias,
                 "layers.0.post_attention_layernorm.weight": self.post_attention_layernorm.weight}
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"layers.0.self_attn.{part}.weight"] = getattr(self, part).weight
        for part in ("gate_proj", "up_proj", "down_proj"):
            names[f"layers.0.mlp.{part}.weight"] = getattr(self, part).weight
        c = self.config
        fields = {"architectures": ["EagleLlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
                  "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                  "num_attention_heads": c.num_attention_heads, "num_key_value_heads": self.num_kv_heads,
                  "head_dim": self.head_dim, "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
                  "max_position_embeddings": c.max_position_embeddings, "torch_dtype": str(dtype).split(".")[-1]}
        theta, scaling = rope_parameters(c)
        fields["rope_theta"] = theta
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            fields["rope_scaling"] = scaling
        return {k: v.detach().to(dtype) for k, v in names.items()}, fields
