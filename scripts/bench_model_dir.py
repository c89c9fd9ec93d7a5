"""Write a model directory with a preset's shapes and the bundled model's tokenizer, for benchmarks that need one.

Benchmark models have random weights (``--load-format dummy``) and, as presets, no tokenizer; structured output
needs one (its grammar is compiled against the vocabulary). This writes the preset's ``config.json`` (with the
tokenizer's BOS/EOS ids) next to SmolLM2's tokenizer files, so e.g. Llama-3.1-8B shapes (vocabulary 128,256) run
with a 49,152-token tokenizer: the grammar masks the rows the tokenizer does not name, so the bitmask still spans
the model's full vocabulary, as on the real model. ``--pad-vocab`` gives the ids above the tokenizer's a text of
their own, as ``pdserve bench serve --peer`` does (bench/model_dir.py says why).

    python -P scripts/bench_model_dir.py llama-3.1-8b .gpu-models/llama8b-smoltok
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pdserve.bench.model_dir import serving_directory
from pdserve.engine.model_loader.presets import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--pad-vocab", action="store_true",
                        help="pad the tokenizer to the preset's vocabulary (every id then decodes to text)")
    args = parser.parse_args()
    serving_directory(args.preset, "dummy", args.out, pad_vocab=args.pad_vocab)
    print(f"wrote {args.out}: {args.preset} shapes, the bundled model's tokenizer"
          + (" padded to the preset's vocabulary" if args.pad_vocab else ""))


if __name__ == "__main__":
    main()
