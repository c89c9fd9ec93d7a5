"""Qwen2 / Qwen2.5: the Llama architecture with a bias on the q/k/v projections (not on o_proj)."""

from __future__ import annotations

from pdserve.engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_switches(cls, config) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False}
