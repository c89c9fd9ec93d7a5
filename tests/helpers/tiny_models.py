"""Tiny random Hugging Face models saved to disk, for tests that need a real model directory.

``make_tiny_model("llama" | "qwen2" | "qwen3", directory, **config_overrides)`` builds the model with
transformers, randomises the parts transformers initialises to constants (norm weights, biases) so that a
loader which forgets them is caught, and ``save_pretrained``s it (safetensors + config + generation config).
No tokenizer is saved: prompts are token ids. Token ids 0, 1 and 2 are pad, bos and eos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Small, but every feature of each architecture is exercised: grouped-query attention, llama3 rope scaling
# (Llama), q/k/v bias (Qwen2), q/k norm with a head_dim that is not hidden/heads (Qwen3), tied and untied heads.
_COMMON: dict[str, Any] = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               initializer_range=0.05)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", dict(
        _COMMON, rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2ForCausalLM", dict(_COMMON, rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(_COMMON, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)),
}


def tiny_hf_config(arch: str, **overrides: Any):
    """The transformers config of tiny model ``arch`` with ``overrides`` applied."""
    from pdserve.engine.model_loader.presets import make_hf_config

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {arch!r}; choose from {sorted(TINY_CONFIGS)}")
    architecture, fields = TINY_CONFIGS[arch]
    return make_hf_config(architecture, **{**fields, "torch_dtype": "float32", **overrides})


def make_tiny_model(arch: str, directory: str | Path, seed: int = 0, **overrides: Any) -> str:
    """Build tiny random model ``arch`` (``llama``, ``qwen2``, ``qwen3``) and save it into ``directory``
    (created if needed). Returns the directory as a string."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_hf_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn_like(p))
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    return str(directory)
