"""The router resolves the served model for its config and tokenizer only, never its weights."""

from __future__ import annotations

import pytest

from pdserve.cli.main import build_parser
from pdserve.services.router.cli import build_config


def test_a_model_directory_without_weights_is_enough_for_the_router(tmp_path) -> None:
    # What `bench serve --pdserve-up` serves a dummy preset from: its config beside the bundled tokenizer.
    from pdserve.bench.model_dir import serving_directory

    directory = serving_directory("qwen3-0.6b", "dummy", tmp_path / "model")
    assert not list((tmp_path / "model").glob("*.safetensors"))
    args = build_parser().parse_args(["router", "--model", directory, "--max-model-len", "4096",
                                      "--served-model-name", "qwen3-0.6b", "--decode", "grpc://127.0.0.1:1"])
    config, tokenizer = build_config(args)
    assert tokenizer is not None and len(tokenizer) == 151936  # padded to the preset's vocabulary
    assert (config.model.name, config.model.max_model_len, config.model.vocab_size) == ("qwen3-0.6b", 4096, 151936)


def test_an_unknown_model_is_still_refused() -> None:
    args = build_parser().parse_args(["router", "--model", "no-such-model", "--decode", "grpc://127.0.0.1:1"])
    with pytest.raises(ValueError, match="unknown model"):
        build_config(args)
