"""EAGLE and EAGLE-3 draft heads: one decoder layer over the target model's hidden states, and their loader.

Both read checkpoints as the EAGLE authors publish them (a directory with ``config.json``, a Llama config of the
head, and ``*.safetensors`` or ``pytorch_model.bin``), the layout vLLM and SGLang load too:

* **EAGLE-1** -- ``fc.weight`` ``[D, 2D]`` (``fc.bias`` optional) mixes ``[embed(token), hidden]``, where
  ``hidden`` is the target's final (normed) hidden state; one Llama decoder layer ``layers.0.*`` follows, without
  its input norm (``layers.0.input_layernorm.weight`` is used when present); the target's ``lm_head`` gives
  the logits (a ``norm.weight`` is applied first when present). Its output is also the next step's ``hidden``.
* **EAGLE-3** -- ``fc.weight`` ``[D, 3D]`` projects the concatenation of three of the target's intermediate
  hidden states (the residual stream entering layers ``eagle_config.eagle_aux_hidden_state_layer_ids``, by
  default ``(2, L // 2, L - 3)``). The layer ``midlayer.*`` (or ``layers.0.*``) normalises the embedding
  (``input_layernorm``) and that hidden state (``hidden_norm``) separately and attends over their
  concatenation (``q/k/v_proj`` take ``2D`` inputs); ``norm.weight`` and the head's own ``lm_head.weight``
  ``[V_draft, D]`` give logits over a small draft vocabulary, mapped to the target's by ``d2t`` (target id =
  draft id + ``d2t[draft id]``). The pre-norm output is the next step's hidden state (no ``fc`` then).

``embed_tokens.weight`` (often stored as a frozen copy) and ``t2d`` are ignored: the head shares the target's
embedding table. Saving the same names (``save_eagle_checkpoint``) is what the training script and the tests do.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pdserve.engine.models.layers import Linear, RMSNorm, RotaryEmbedding, default_weight_loader, rope_parameters
from pdserve.engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, head_dim_of
from pdserve.engine.worker.attention import AttentionBackend, AttentionMetadata

HEADS_DIR = Path(__file__).parent / "heads"  # heads shipped with pdserve, by name
_STACKED = ((".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"),
            (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1))


def resolve_head_dir(model: str) -> Path:
    """A head checkpoint directory: a local path, or the name of a head shipped in ``engine/spec_decode/heads``."""
    path = Path(model).expanduser()
    if not path.is_dir() and (HEADS_DIR / model).is_dir():
        path = HEADS_DIR / model
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in HEADS_DIR.glob("*") if (p / "config.json").is_file())
        raise ValueError(f"speculative model {model!r} is not a head checkpoint directory (config.json and "
                         f"*.safetensors); shipped heads: {shipped or 'none'}")
    return path


def read_head_config(directory: Path) -> dict[str, Any]:
    with open(directory / "config.json") as f:
        return json.load(f)


def llama_config(fields: dict[str, Any]):
    from transformers import LlamaConfig

    known = {k: v for k, v in fields.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    return LlamaConfig(**known)


class EagleHead(nn.Module):
    """One EAGLE (``version=1``) or EAGLE-3 (``version=3``) head. ``forward`` takes the step's tokens, their
    positions, the hidden states they follow (``[T, 3D]`` target features for EAGLE-3's first step, else
    ``[T, D]``) and the head's one-layer KV cache; it returns ``(for_logits, next_hidden)``, each ``[T, D]``.
    ``embed`` and ``target_logits`` are the target's embedding and logits functions (shared, not copied)."""

    def __init__(self, config, version: int, backend: AttentionBackend, *, input_norm: bool, final_norm: bool,
                 fc_bias: bool, embed, target_logits, qkv_bias: bool = False, o_bias: bool = False) -> None:
        super().__init__()
        self.version = version
        # The target's modules, not submodules of the head (not its parameters, never saved with it).
        object.__setattr__(self, "embed", embed)
        object.__setattr__(self, "target_logits", target_logits)
        d = config.hidden_size
        rotary = RotaryEmbedding(head_dim_of(config), *rope_parameters(config),
                                 max_position=config.max_position_embeddings)
        if version == 1:
            self.fc = Linear(2 * d, d, bias=fc_bias)
            self.layer = LlamaDecoderLayer(config, backend, rotary, qkv_bias, o_bias, False)
            if not input_norm:
                self.layer.input_layernorm = nn.Identity()
            self.norm = RMSNorm(d, config.rms_norm_eps) if final_norm else None
        else:
            self.fc = Linear(3 * d, d, bias=fc_bias)
            self.layer = Eagle3Layer(config, backend, rotary, qkv_bias, o_bias)
            self.norm = RMSNorm(d, config.rms_norm_eps)
            draft_vocab = int(getattr(config, "draft_vocab_size", None) or config.vocab_size)
            self.lm_head = Linear(d, draft_vocab)
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                kv_cache: torch.Tensor, md: AttentionMetadata, from_target: bool):
        e = self.embed(input_ids)  # [T, D]
        if self.version == 1:
            x, residual = self.layer(positions, self.fc(torch.cat((e, hidden), dim=-1)), None, kv_cache, md)
            out = x + residual
            return (self.norm(out) if self.norm is not None else out), out
        if from_target:
            hidden = self.fc(hidden)  # [T, 3D] -> [T, D]
        out = self.layer(positions, e, hidden, kv_cache, md)
        return self.norm(out), out

    def draft_tokens(self, for_logits: torch.Tensor) -> torch.Tensor:
        """The greedy guess of each row, as target token ids ``[S]``."""
        if self.version == 1:
            return self.target_logits(for_logits).argmax(dim=-1)
        ids = torch.nn.functional.linear(for_logits, self.lm_head.weight).argmax(dim=-1)
        return ids + self.d2t[ids]

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name.startswith(("embed_tokens.", "t2d")) or (self.version == 1 and name.startswith("lm_head.")):
                continue  # the target's embedding and head are shared; t2d is only a training aid
            if name == "d2t" and "d2t" in buffers:
                buffers["d2t"].copy_(tensor.to(torch.long))
                loaded.add("d2t")
                continue
            for prefix in ("midlayer.", "layers.0."):
                if name.startswith(prefix):
                    name = "layer." + name[len(prefix):]
            shard = None
            for fused, part, shard_id in _STACKED:
                if part in name:
                    name, shard = name.replace(part, fused), shard_id
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"EAGLE checkpoint tensor {name!r} has no place in an EAGLE-{self.version} head")
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            loaded.add(name)
        return loaded


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over ``[input_layernorm(embed), hidden_norm(hidden)]`` (``2D`` wide),
    the residual stream starting from ``hidden`` (or from its normed value with ``norm_before_residual``)."""

    def __init__(self, config, backend: AttentionBackend, rotary: RotaryEmbedding, qkv_bias: bool,
                 o_bias: bool) -> None:
        super().__init__()
        d = config.hidden_size
        wide = copy.copy(config)
        wide.hidden_size, wide.head_dim = 2 * d, head_dim_of(config)
        self.self_attn = LlamaAttention(wide, backend, rotary, qkv_bias, o_bias, False)
        self.self_attn.o_proj = Linear(config.num_attention_heads * head_dim_of(config), d, o_bias)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, positions, embeds, hidden, kv_cache, md) -> torch.Tensor:
        """Returns the layer's output ``[T, D]`` (pre-norm)."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        x = self.self_attn(positions, x, kv_cache, md)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x) + residual


def aux_layer_ids(fields: dict[str, Any], num_target_layers: int) -> tuple[int, ...]:
    """EAGLE-3's target layers: ``eagle_config.eagle_aux_hidden_state_layer_ids`` if the checkpoint names them,
    else the authors' default ``(2, L // 2, L - 3)``."""
    eagle_config = fields.get("eagle_config") or {}
    ids = eagle_config.get("eagle_aux_hidden_state_layer_ids") or fields.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        n = num_target_layers
        ids = (2, n // 2, n - 3)
    ids = tuple(int(i) for i in ids)
    if len(ids) != 3:
        raise ValueError(f"an EAGLE-3 head reads three target layers, the checkpoint names {list(ids)}")
    return ids


@torch.no_grad()
def load_eagle_head(directory: Path, version: int, target: nn.Module, backend: AttentionBackend,
                    device: torch.device, dtype: torch.dtype) -> tuple[EagleHead, Any]:
    """Build the head of ``directory`` for ``target`` (a loaded causal LM) and load its weights; returns
    ``(head, its Llama config)``. Refuses heads whose shapes cannot fit the target."""
    fields = read_head_config(directory)
    config = llama_config(fields)
    target_config = target.config
    if config.hidden_size != target_config.hidden_size:
        raise ValueError(f"EAGLE head in {directory} has hidden size {config.hidden_size}, the target "
                         f"{target_config.hidden_size}")
    if config.num_hidden_layers != 1:
        raise ValueError(f"EAGLE head in {directory} has {config.num_hidden_layers} layers; pdserve runs one-layer "
                         f"heads")
    names = {name.removeprefix("model.") for name in _tensor_names(directory)}
    if version == 3 and not any(n.startswith(("midlayer.", "layers.0.")) and "hidden_norm" in n for n in names):
        raise ValueError(f"{directory} is not an EAGLE-3 checkpoint (no midlayer.hidden_norm); use method eagle")
    if version == 1 and "fc.weight" in names and any("hidden_norm" in n for n in names):
        raise ValueError(f"{directory} is an EAGLE-3 checkpoint; use method eagle3")
    from pdserve.engine.model_loader.weights import _default_dtype

    with torch.device(device), _default_dtype(dtype):
        head = EagleHead(config, version, backend, input_norm="layers.0.input_layernorm.weight" in names,
                         final_norm="norm.weight" in names, fc_bias="fc.bias" in names,
                         embed=target.model.embed_tokens, target_logits=target.compute_logits,
                         # Qwen2 targets' heads carry q/k/v biases: taken from the checkpoint, as the norms are
                         qkv_bias=any(n.endswith("self_attn.q_proj.bias") for n in names),
                         o_bias=any(n.endswith("self_attn.o_proj.bias") for n in names))
    head.requires_grad_(False)
    loaded = head.load_weights(iter_head_tensors(directory))
    own = {n for n, _ in head.named_parameters()}
    missing = sorted(own - loaded)
    if version == 3 and "d2t" not in loaded:
        draft_vocab = head.lm_head.weight.shape[0]
        if draft_vocab != target_config.vocab_size:
            raise ValueError(f"EAGLE-3 head in {directory} has a {draft_vocab}-token vocabulary but no d2t map")
    if missing:
        raise ValueError(f"EAGLE checkpoint in {directory} lacks {', '.join(missing[:5])}")
    return head.eval(), config


def iter_head_tensors(directory: Path):
    """Every tensor of a head checkpoint: its ``*.safetensors`` files, or else the PyTorch pickles many
    published heads ship (``*.bin`` / ``*.pt``, read with ``weights_only``: tensors only, no code)."""
    if any(directory.glob("*.safetensors")):
        from pdserve.engine.model_loader.weights import iter_safetensors

        yield from iter_safetensors(directory)
        return
    files = sorted([*directory.glob("*.bin"), *directory.glob("*.pt")])
    if not files:
        raise ValueError(f"no weights in {directory} (*.safetensors, *.bin or *.pt)")
    for file in files:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _tensor_names(directory: Path):
    """The tensor names of a head checkpoint (safetensors: read from their headers only)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        yield from (name for name, _ in iter_head_tensors(directory))
        return
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield from f.keys()


def save_eagle_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write a head in the published layout: ``config.json`` and ``model.safetensors`` (names as above)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
