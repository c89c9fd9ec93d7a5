"""Turn what the user typed (bundled name, local directory, dummy preset) into a config and local paths."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.engine.model_loader.bundled import BUNDLED, ensure_bundled
from pdserve.engine.model_loader.presets import PRESETS, preset_config
from pdserve.engine.models.registry import SUPPORTED_ARCHITECTURES, supported_architecture

LOAD_FORMATS = ("auto", "safetensors", "dummy")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class ResolvedModel:
    """``path``: local HF directory whose weights to load (None for dummy weights); ``tokenizer_path``: where
    the tokenizer lives (None when there is none, e.g. a dummy preset); ``hf_config``: the transformers config."""

    path: str | None
    tokenizer_path: str | None
    hf_config: Any


def resolve_model(model: str, load_format: str = "auto", cache_dir: str | None = None) -> ResolvedModel:
    """Resolve ``model`` for ``load_format``.

    - a bundled short name (``smollm2-135m-instruct``): converted once into the cache folder (see
      :mod:`.bundled`), then loaded from there;
    - a local Hugging Face directory with a supported architecture and safetensors weights;
    - with ``load_format="dummy"``: a shape preset (``llama-3.1-8b``, ``qwen3-8b``, ...), or a bundled name or
      local directory whose config is used with random weights.

    Raises ``ValueError`` for an unknown name, a missing directory or an unsupported architecture.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r} (choose one of {', '.join(LOAD_FORMATS)})")
    dummy = load_format == "dummy"
    if dummy and model in PRESETS:
        return ResolvedModel(path=None, tokenizer_path=None, hf_config=preset_config(model))
    if model in BUNDLED:
        directory = ensure_bundled(model, cache_dir)
    elif os.path.isdir(os.path.expanduser(model)):
        directory = Path(os.path.expanduser(model)).resolve()
    elif _looks_like_path(model):
        raise ValueError(f"model directory {model!r} does not exist (models are never downloaded: pass a local "
                         f"Hugging Face directory, a bundled name or a dummy preset)")
    else:
        raise ValueError(_unknown_name_message(model))
    hf_config = load_hf_config(directory)
    has_tokenizer = any((directory / f).is_file() for f in _TOKENIZER_FILES)
    tokenizer_path = str(directory) if has_tokenizer else None
    if dummy:
        return ResolvedModel(path=None, tokenizer_path=tokenizer_path, hf_config=hf_config)
    if not any(directory.glob("*.safetensors")):
        raise ValueError(f"{directory} has no *.safetensors weights (only safetensors checkpoints are supported; "
                         f"use load_format='dummy' for random weights)")
    return ResolvedModel(path=str(directory), tokenizer_path=tokenizer_path, hf_config=hf_config)


def load_hf_config(directory: Path):
    """The transformers config of a local directory, checked to be an architecture we can run."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        hf_config = AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot read the model config in {directory}: {e}") from e
    if supported_architecture(hf_config) is None:
        archs = getattr(hf_config, "architectures", None)
        raise ValueError(f"unsupported model architecture {archs} in {directory}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return hf_config


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "~")) or os.sep in model or (os.altsep is not None and os.altsep in model)


def _unknown_name_message(model: str) -> str:
    return (f"unknown model {model!r}: not a bundled model ({', '.join(sorted(BUNDLED))}) nor a local directory; "
            f"with load_format='dummy' these shape presets also work: {', '.join(sorted(PRESETS))}")
