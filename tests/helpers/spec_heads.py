"""Random EAGLE, EAGLE-3 and Medusa checkpoints in the published layouts, for a given target model directory.

They go through the same loader as downloaded heads do (names, shapes, ``config.json``); their guesses are
random, so acceptance is near zero, but greedy outputs must stay exactly those of plain decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdserve.engine.spec_decode.eagle_head import save_eagle_checkpoint


def _target(target_dir: str) -> dict:
    return json.loads((Path(target_dir) / "config.json").read_text())


def _head_config(t: dict, **extra) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
            "rope_theta", "rope_scaling", "max_position_embeddings", "vocab_size", "head_dim", "rope_parameters")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
            **{k: t[k] for k in keys if k in t}, **extra}


def _layer(t: dict, prefix: str, g: torch.Generator, in_dim: int, std: float) -> dict[str, torch.Tensor]:
    d, inter = t["hidden_size"], t["intermediate_size"]
    hd = t.get("head_dim") or d // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd

    def rand(*shape):
        return torch.randn(*shape, generator=g) * std

    return {f"{prefix}.self_attn.q_proj.weight": rand(q, in_dim), f"{prefix}.self_attn.k_proj.weight": rand(kv, in_dim),
            f"{prefix}.self_attn.v_proj.weight": rand(kv, in_dim), f"{prefix}.self_attn.o_proj.weight": rand(d, q),
            f"{prefix}.mlp.gate_proj.weight": rand(inter, d), f"{prefix}.mlp.up_proj.weight": rand(inter, d),
            f"{prefix}.mlp.down_proj.weight": rand(d, inter),
            f"{prefix}.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(d, generator=g)}


def make_eagle_head(target_dir: str, directory: Path, seed: int = 0, std: float = 0.05, qkv_bias: bool = False) -> str:
    """An EAGLE-1 head: ``fc.weight`` (with a bias) and ``layers.0.*`` without an input norm, plus the frozen
    ``embed_tokens.weight`` copy published heads carry (ignored by the loader); ``qkv_bias``: q/k/v biases, as
    the heads of Qwen2 targets have."""
    t = _target(target_dir)
    g = torch.Generator().manual_seed(seed)
    d = t["hidden_size"]
    tensors = _layer(t, "layers.0", g, d, std)
    tensors["fc.weight"] = torch.randn(d, 2 * d, generator=g) * std
    tensors["fc.bias"] = torch.randn(d, generator=g) * std
    tensors["embed_tokens.weight"] = torch.randn(t["vocab_size"], d, generator=g)
    if qkv_bias:
        for part in ("q", "k", "v"):
            rows = tensors[f"layers.0.self_attn.{part}_proj.weight"].shape[0]
            tensors[f"layers.0.self_attn.{part}_proj.bias"] = torch.randn(rows, generator=g) * 0.1
    save_eagle_checkpoint(directory, tensors, _head_config(t))
    return str(directory)


def make_eagle3_head(target_dir: str, directory: Path, seed: int = 0, std: float = 0.05,
                     draft_vocab: int = 96, aux_layers: tuple[int, ...] | None = (0, 1, 1)) -> str:
    """An EAGLE-3 head: ``fc`` over three target layers, ``midlayer.*`` with 2D-wide q/k/v, its own norm and a
    ``draft_vocab``-token head with ``d2t`` / ``t2d`` maps (draft id i -> target id 3 + 5 i, wrapping).
    ``aux_layers`` None: the config names no layers (the loader's default ``(2, L // 2, L - 3)``)."""
    t = _target(target_dir)
    g = torch.Generator().manual_seed(seed)
    d, vocab = t["hidden_size"], t["vocab_size"]
    tensors = _layer(t, "midlayer", g, 2 * d, std)
    tensors["midlayer.input_layernorm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    tensors["midlayer.hidden_norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    tensors["fc.weight"] = torch.randn(d, 3 * d, generator=g) * std
    tensors["norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    tensors["lm_head.weight"] = torch.randn(draft_vocab, d, generator=g) * std
    target_ids = sorted({(3 + 5 * i) % vocab for i in range(draft_vocab)})
    assert len(target_ids) == draft_vocab
    tensors["d2t"] = torch.tensor(target_ids) - torch.arange(draft_vocab)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids] = True
    tensors["t2d"] = t2d
    extra = {} if aux_layers is None else {"eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_layers)}}
    config = _head_config(t, draft_vocab_size=draft_vocab, **extra)
    save_eagle_checkpoint(directory, tensors, config)
    return str(directory)


def make_medusa_heads(target_dir: str, directory: Path, num_heads: int = 3, num_layers: int = 1,
                      layout: str = "medusa", seed: int = 0) -> str:
    """Medusa heads in Medusa's own layout (``medusa_head.{i}.{j}.linear.*``, ``medusa_head.{i}.{L}.weight``)
    or vLLM's (``blocks.{i}.layers.{j}.*``, ``lm_heads.{i}.weight``)."""
    t = _target(target_dir)
    g = torch.Generator().manual_seed(seed)
    d, vocab = t["hidden_size"], t["vocab_size"]
    tensors = {}
    for i in range(num_heads):
        for j in range(num_layers):
            w, b = torch.randn(d, d, generator=g) * 0.05, torch.randn(d, generator=g) * 0.05
            if layout == "medusa":
                tensors[f"medusa_head.{i}.{j}.linear.weight"], tensors[f"medusa_head.{i}.{j}.linear.bias"] = w, b
            else:
                tensors[f"blocks.{i}.layers.{j}.weight"], tensors[f"blocks.{i}.layers.{j}.bias"] = w, b
        head = torch.randn(vocab, d, generator=g) * 0.05
        tensors[f"medusa_head.{i}.{num_layers}.weight" if layout == "medusa" else f"lm_heads.{i}.weight"] = head
    config = ({"medusa_num_heads": num_heads, "medusa_num_layers": num_layers} if layout == "medusa"
              else {"num_heads": num_heads, "num_hidden_layers": num_layers, "hidden_size": d, "vocab_size": vocab})
    save_eagle_checkpoint(directory, tensors, config)
    return str(directory)


def copying_head(target: str, directory: Path) -> str:
    """An EAGLE-1 head that reproduces a one-layer target: ``fc`` passes the token's embedding through, the layer
    is the target's layer (input norm included) and the target's final norm precedes the shared lm_head. Its
    context lacks the first token, so it is close to the target but not always right."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(target) / "model.safetensors"))
    config = json.loads((Path(target) / "config.json").read_text())
    d = config["hidden_size"]
    tensors = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.layers.0.")}
    tensors["fc.weight"] = torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1)
    tensors["norm.weight"] = weights["model.norm.weight"]
    save_eagle_checkpoint(directory, tensors, {**config, "architectures": ["LlamaForCausalLM"]})
    return str(directory)


def as_pickle(directory: str, filename: str) -> str:
    """Rewrite a head saved as safetensors into a PyTorch pickle ``filename`` (``pytorch_model.bin``,
    ``medusa_lm_head.pt``), as many published heads are shipped."""
    from safetensors.torch import load_file

    path = Path(directory)
    torch.save(load_file(str(path / "model.safetensors")), path / filename)
    (path / "model.safetensors").unlink()
    return directory
