"""Model resolution (bundled / local / dummy presets), loading, and the errors users see."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.model_loader import load_model, resolve_model
from pdserve.engine.model_loader import bundled
from pdserve.engine.model_loader.presets import PRESETS, preset_config
from pdserve.engine.models.registry import get_model_class
from pdserve.engine.worker.torch_attention import TorchAttentionBackend
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


def model_config(model: str, load_format: str = "auto", seed: int = 0) -> ModelConfig:
    r = resolve_model(model, load_format)
    return ModelConfig(model=model, load_format=load_format, seed=seed, path=r.path,
                       tokenizer_path=r.tokenizer_path, hf_config=r.hf_config)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="no-such-model") as e:
        resolve_model("no-such-model", "auto")
    assert "smollm2-135m-instruct" in str(e.value) and "llama-3.1-8b" in str(e.value)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="no-such-preset"):
        resolve_model("no-such-preset", "dummy")


def test_missing_directory() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("/nonexistent/dir/for/pdserve", "auto")


def test_directory_without_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path), "auto")


def test_unsupported_architecture(tmp_path) -> None:
    from transformers import GPT2Config

    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported model architecture.*GPT2LMHeadModel"):
        resolve_model(str(tmp_path), "auto")


def test_directory_without_safetensors(tmp_path, tiny_dir) -> None:
    (tmp_path / "config.json").write_text(Path(tiny_dir, "config.json").read_text())
    with pytest.raises(ValueError, match="safetensors"):
        resolve_model(str(tmp_path), "auto")
    assert resolve_model(str(tmp_path), "dummy").path is None  # the config alone is enough for dummy


def test_bad_load_format(tiny_dir) -> None:
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(tiny_dir, "pickle")


def test_checkpoint_missing_a_tensor(tmp_path, tiny_dir) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(tiny_dir, "model.safetensors")))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(Path(tiny_dir, "config.json").read_text())
    with pytest.raises(ValueError, match="k_norm"):
        load_model(model_config(str(tmp_path)), "cpu", "float32")


# ---------------------------------------------------------------------------------------------- dummy
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_match_transformers(name: str) -> None:
    """Built on the meta device: our model has exactly the parameter count of transformers' for the preset."""
    from transformers import AutoModelForCausalLM

    cfg = preset_config(name)
    with torch.device("meta"):
        ours = get_model_class(cfg.architectures[0])(cfg, TorchAttentionBackend())
        ref = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert resolve_model(name, "dummy").tokenizer_path is None


def test_required_presets_exist() -> None:
    assert {"llama-3.1-8b", "qwen3-0.6b", "qwen3-8b", "llama-3.2-1b", "smollm2-135m"} <= set(PRESETS)
    assert sum(p.numel() for p in _meta_model("llama-3.1-8b").parameters()) == 8_030_261_248


def _meta_model(name: str):
    cfg = preset_config(name)
    with torch.device("meta"):
        return get_model_class(cfg.architectures[0])(cfg, TorchAttentionBackend())


def test_dummy_weights_deterministic(tiny_dir) -> None:
    a = load_model(model_config(tiny_dir, "dummy", seed=3), "cpu", "float32")
    b = load_model(model_config(tiny_dir, "dummy", seed=3), "cpu", "float32")
    c = load_model(model_config(tiny_dir, "dummy", seed=4), "cpu", "float32")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(sa[qkv], sc[qkv])
    assert torch.all(sa["model.layers.0.self_attn.q_norm.weight"] == 1)
    assert a.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32


def test_bfloat16_load(tiny_dir) -> None:
    model = load_model(model_config(tiny_dir), "cpu", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].self_attn.rotary.inv_freq.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- bundled
def test_bundled_model_is_a_hf_directory() -> None:
    """First use converts the GGUF (once per cache folder, ~20 s); afterwards resolving is instant."""
    first = resolve_model("smollm2-135m-instruct", "auto")
    start = time.perf_counter()
    again = resolve_model("smollm2-135m-instruct", "auto")
    assert time.perf_counter() - start < 2.0
    assert again.path == first.path == first.tokenizer_path
    d = Path(first.path)
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (d / f).is_file(), f
    assert first.hf_config.architectures == ["LlamaForCausalLM"]
    template = json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template


def test_bundled_conversion_is_atomic(tmp_path, monkeypatch) -> None:
    """A failed conversion leaves nothing behind; losing a race to another process keeps the winner's copy."""

    def failing(gguf_dir, gguf_file, out_dir, dtype):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundled, "convert_gguf", failing)
    with pytest.raises(RuntimeError):
        bundled.ensure_bundled("smollm2-135m-instruct", str(tmp_path))
    models = tmp_path / "models"
    assert list(models.iterdir()) == []

    dest = models / "smollm2-135m-instruct"

    def racing(gguf_dir, gguf_file, out_dir, dtype):
        # Another process publishes while this one is still converting.
        dest.mkdir()
        (dest / "config.json").write_text('{"winner": true}')
        (dest / bundled._DONE_MARKER).write_text("{}")
        (out_dir / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(bundled, "convert_gguf", racing)
    assert bundled.ensure_bundled("smollm2-135m-instruct", str(tmp_path)) == dest
    assert json.loads((dest / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in models.iterdir()] == ["smollm2-135m-instruct"]  # the loser's temp folder is gone


def test_cache_dir_from_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    assert bundled.cache_root() == tmp_path
    monkeypatch.delenv(bundled.CACHE_ENV)
    assert bundled.cache_root() == Path.home() / ".cache" / "pdserve"
