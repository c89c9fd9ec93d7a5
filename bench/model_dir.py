"""Model directories another engine can load, for the side-by-side benchmarks (``--peer``).

pdserve runs a shape preset from its name alone; vLLM needs a directory with a ``config.json``
(``load_format="dummy"`` then draws random weights in those shapes). Offline, the config is enough (prompts are
token ids, ``skip_tokenizer_init``). A server needs a tokenizer too: the preset's config goes next to the bundled
model's tokenizer, **padded to the preset's vocabulary** — a random model samples ids anywhere in its vocabulary,
and an id the tokenizer cannot name decodes to no text at all, which a streaming client cannot tell from no token.
Padded ids decode to ``" ~<id>"`` (one word each, as real tokens do); the prompt side is untouched, since no merge
produces them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _write_preset_config(preset: str, out: Path, **overrides: object) -> None:
    from pdserve.engine.model_loader.presets import PRESETS, make_hf_config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    architecture, fields = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    make_hf_config(architecture, **{**fields, **overrides}).to_json_file(str(out / "config.json"))


def model_directory(model: str, load_format: str, out: str | os.PathLike[str]) -> str:
    """A directory holding ``model``'s config (and weights, unless ``load_format`` is dummy): a dummy preset's
    config is written into ``out``; a bundled name or a local directory is used where it is."""
    from pdserve.engine.model_loader.bundled import BUNDLED, ensure_bundled
    from pdserve.engine.model_loader.presets import PRESETS

    if load_format == "dummy" and model in PRESETS:
        _write_preset_config(model, Path(out))
        return str(out)
    if model in BUNDLED:
        return str(ensure_bundled(model))
    if os.path.isdir(os.path.expanduser(model)):
        return str(Path(os.path.expanduser(model)).resolve())
    raise ValueError(f"model {model!r} is not a dummy preset, a bundled name or a local directory")


def _byte_level(node: object) -> bool:
    """Whether a tokenizer.json component is, or contains, a ByteLevel step."""
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_byte_level(v) for v in node)
    return False


def pad_tokenizer_vocab(directory: Path, vocab_size: int) -> int:
    """Give every id below ``vocab_size`` that the byte-level BPE tokenizer in ``directory`` lacks a vocabulary
    entry of its own; returns how many were added."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    is_bpe = model.get("type", "BPE" if "merges" in model else None) == "BPE" and isinstance(model.get("vocab"), dict)
    # Converters differ in where they say "byte-level": the decoder, the pre-tokenizer, or inside a Sequence of
    # either (transformers 5.17 and 5.25 write different files from the same GGUF).
    if not is_bpe or not (_byte_level(data.get("decoder")) or _byte_level(data.get("pre_tokenizer"))):
        raise ValueError(f"{path}: only a byte-level BPE tokenizer can be padded (model {model.get('type')!r}, "
                         f"decoder {json.dumps(data.get('decoder'))[:200]}, "
                         f"pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:200]})")
    vocab: dict[str, int] = model["vocab"]
    taken = set(vocab.values()) | {int(t["id"]) for t in data.get("added_tokens") or []}
    added = 0
    for i in range(vocab_size):
        # "Ġ" is the byte-level form of a space; the other characters are printable ASCII, which map to themselves.
        name = f"\u0120~{i}"
        if i not in taken and name not in vocab:
            vocab[name] = i
            added += 1
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return added


def serving_directory(model: str, load_format: str, out: str | os.PathLike[str], pad_vocab: bool = True) -> str:
    """A directory a server can load, tokenizer included: a dummy preset's config next to the bundled model's
    tokenizer (padded to the preset's vocabulary unless ``pad_vocab`` is False) written into ``out``; a bundled
    name or a local directory (which must hold a tokenizer) is used where it is."""
    from pdserve.engine.model_loader.presets import PRESETS
    from pdserve.engine.model_loader.resolve import resolve_model

    if not (load_format == "dummy" and model in PRESETS):
        directory = model_directory(model, load_format, out)
        if not any((Path(directory) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise ValueError(f"{directory} has no tokenizer; a server needs one (a dummy preset gets the bundled one)")
        return directory
    out_dir = Path(out)
    bundled = resolve_model("smollm2-135m-instruct")  # converts the bundled GGUF on first use
    assert bundled.tokenizer_path is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (Path(bundled.tokenizer_path) / name).is_file():
            shutil.copy(Path(bundled.tokenizer_path) / name, out_dir / name)
    ids = bundled.hf_config
    _write_preset_config(model, out_dir, bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id)
    config = json.loads((out_dir / "config.json").read_text())
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    # The bundled tokenizer's limit would otherwise cap (or warn about) prompts the preset's context allows.
    tok_config["model_max_length"] = config["max_position_embeddings"]
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    if pad_vocab:
        pad_tokenizer_vocab(out_dir, int(config["vocab_size"]))
    return str(out_dir)
