"""Qwen3 (dense): the Llama architecture plus an RMSNorm over each query and key head before the rotary
embedding; no q/k/v bias unless the config asks for one."""

from __future__ import annotations

from pdserve.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_switches(cls, config) -> dict[str, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True}
