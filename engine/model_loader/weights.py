"""Build one of our models on its device and fill its weights (safetensors, or random for dummy)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pdserve.engine.models.layers import RMSNorm
from pdserve.engine.models.parallel_layers import ModelShard
from pdserve.engine.models.registry import get_model_class, supported_architecture
from pdserve.engine.worker.attention import AttentionBackend

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16}
DUMMY_STD = 0.02  # std of random (dummy) weights: small enough that activations stay finite in bf16


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA and float32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose auto, float32, bfloat16 or float16)")
    return _DTYPES[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Parameters are created with torch.empty; this makes them the model dtype without a cast afterwards.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config, device: torch.device | str, dtype: torch.dtype | str,
               attn_backend: AttentionBackend | None = None, shard: ModelShard | None = None) -> nn.Module:
    """Build the model for ``model_config.hf_config`` on ``device`` in ``dtype`` and load its weights.

    Weights come from the safetensors files in ``model_config.path``; with ``load_format="dummy"`` (or no
    path) they are random, deterministic from ``model_config.seed`` and generated on the device.
    ``attn_backend`` defaults to the pure-torch backend.

    ``shard`` (multi-process executor): build this rank's part of the model; its checkpoint tensors are read as
    lazy slices, so only the rank's rows and columns leave the file. Dummy weights are then drawn per rank (they
    are random either way, but differ from the single-device ones).
    """
    from pdserve.engine.worker.torch_attention import TorchAttentionBackend

    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    hf_config = model_config.hf_config
    arch = supported_architecture(hf_config)
    if arch is None:
        raise ValueError(f"unsupported model architecture {getattr(hf_config, 'architectures', None)}")
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) and window < hf_config.max_position_embeddings:
        logger.warning("%s declares a %d-token sliding window; pdserve attends over the full context, so "
                       "outputs differ from the reference beyond that length", model_config.model, window)
    start = time.perf_counter()
    with torch.device(device), _default_dtype(dtype):
        backend = attn_backend or TorchAttentionBackend()
        model_class = get_model_class(arch)
        model = model_class(hf_config, backend) if shard is None else model_class(hf_config, backend, shard=shard)
    model.requires_grad_(False)
    if model_config.load_format == "dummy" or model_config.path is None:
        init_dummy_weights(model, model_config.seed + (0 if shard is None else 1000 * shard.pp_rank + shard.tp_rank))
    else:
        load_safetensors(model, Path(model_config.path), lazy=shard is not None)
    logger.info("loaded %s (%s, %s) in %.1fs", model_config.model, arch, dtype, time.perf_counter() - start)
    return model.eval()


class LazyTensor:
    """A checkpoint tensor not read yet: :meth:`narrow` reads only a slice of it, :meth:`full` all of it.
    Tensor-parallel weight loaders take these, so a rank reads just its shard."""

    def __init__(self, source) -> None:
        self._source = source  # a safetensors slice (get_slice)
        self.shape = torch.Size(source.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._source[tuple(index)]

    def full(self) -> torch.Tensor:
        return self._source[:]


def iter_safetensors(directory: Path, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """Every tensor of every ``*.safetensors`` file in ``directory`` (on CPU, one at a time); with ``lazy``,
    :class:`LazyTensor` handles that read on demand."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {directory}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, (LazyTensor(f.get_slice(name)) if lazy else f.get_tensor(name))


@torch.no_grad()
def load_safetensors(model: nn.Module, directory: Path, lazy: bool = False) -> None:
    """Load a checkpoint through the model's ``load_weights``; every parameter must be filled."""
    loaded = model.load_weights(iter_safetensors(directory, lazy))
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint in {directory} lacks {len(missing)} parameters: {shown}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights on the parameters' device: norms 1, biases 0, everything else N(0, DUMMY_STD)."""
    first = next(model.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for name, p in model.named_parameters():
        if id(p) in norm_params:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, DUMMY_STD, generator=gen)
