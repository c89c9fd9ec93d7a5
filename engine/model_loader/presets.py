"""Shape presets for ``load_format="dummy"``: the exact shapes of real models, as Hugging Face config objects.

They let benchmarks and tests run a model of a real size with random weights and no files at all.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# name -> (architecture, config fields). Values are copied from each model's published config.json.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.1-8b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])),
    "llama-3.2-1b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])),
    "smollm2-135m": ("LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)),
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)),
    "qwen3-8b": ("Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)),
}


def make_hf_config(architecture: str, **fields: Any):
    """A transformers config object for ``architecture`` (Llama / Mistral / Qwen2 / Qwen3) with ``fields``."""
    import transformers

    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[architecture]
    # rope_theta / rope_scaling are the 4.x names; 5.x folds them into rope_parameters and still accepts them.
    fields = {"torch_dtype": "bfloat16", **fields}
    return transformers.AutoConfig.for_model(model_type, architectures=[architecture], **fields)


def preset_config(name: str):
    """The HF config of preset ``name``; ``ValueError`` listing the presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown dummy model preset {name!r}; known presets: {', '.join(sorted(PRESETS))} "
                         f"(or pass a local model directory)")
    architecture, fields = PRESETS[name]
    return make_hf_config(architecture, **fields)
