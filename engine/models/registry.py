"""Which of our model classes runs a Hugging Face ``architectures`` name."""

from __future__ import annotations

import importlib

from torch import nn

# HF architecture name -> (module under pdserve.engine.models, class name). Mistral is Llama with other defaults.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def supported_architecture(hf_config) -> str | None:
    """The first of the config's ``architectures`` that we can run, or None."""
    return next((a for a in (getattr(hf_config, "architectures", None) or []) if a in _MODELS), None)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for ``architecture``; ``ValueError`` listing the supported ones otherwise."""
    if architecture not in _MODELS:
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(f"pdserve.engine.models.{module}"), name)
