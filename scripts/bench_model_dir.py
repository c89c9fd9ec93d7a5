"""Write a model directory with a preset's shapes and the bundled model's tokenizer, for benchmarks that need one.

Benchmark models have random weights (``--load-format dummy``) and, as presets, no tokenizer; structured output
needs one (its grammar is compiled against the vocabulary). This writes the preset's ``config.json`` (with the
tokenizer's BOS/EOS ids) next to SmolLM2's tokenizer files, so e.g. Llama-3.1-8B shapes (vocabulary 128,256) run
with a 49,152-token tokenizer: the grammar masks the rows the tokenizer does not name, so the bitmask still spans
the model's full vocabulary, as on the real model.

    python -P scripts/bench_model_dir.py llama-3.1-8b .gpu-models/llama8b-smoltok
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pdserve.engine.model_loader.presets import PRESETS, make_hf_config
from pdserve.engine.model_loader.resolve import resolve_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    bundled = resolve_model("smollm2-135m-instruct")  # converts the bundled GGUF on first use
    assert bundled.tokenizer_path is not None
    args.out.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (Path(bundled.tokenizer_path) / name).is_file():
            shutil.copy(Path(bundled.tokenizer_path) / name, args.out / name)
    architecture, fields = PRESETS[args.preset]
    ids = bundled.hf_config
    make_hf_config(architecture, **{**fields, "bos_token_id": ids.bos_token_id, "eos_token_id": ids.eos_token_id}
                   ).to_json_file(str(args.out / "config.json"))
    print(f"wrote {args.out}: {args.preset} shapes, the bundled model's tokenizer")


if __name__ == "__main__":
    main()
