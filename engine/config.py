"""The engine's one frozen, composite configuration, built once at an entry point.

Inner components receive plain values taken from it; nothing mutates it after construction. Build it with
:func:`EngineConfig.create`, which resolves the model (bundled name, local directory or dummy preset) and fills the
values that depend on it, such as ``max_model_len``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.core.block_hash import DEFAULT_HASH_ALGO, DEFAULT_HASH_SEED
from pdserve.engine.security import ClusterSecret
from pdserve.engine.spec_decode.config import SpeculativeConfig

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how.

    ``model`` is what the user typed (a bundled short name, a local Hugging Face directory, or a shape preset
    with ``load_format="dummy"``); ``path`` is the resolved local directory (None for dummy weights).
    """

    model: str = DEFAULT_MODEL
    load_format: str = "auto"  # "auto" (safetensors / bundled) | "dummy" (random weights, exact shapes)
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU; or "float32" | "bfloat16" | "float16"
    max_model_len: int = 2048
    seed: int = 0
    served_model_name: str = DEFAULT_MODEL
    path: str | None = None
    tokenizer_path: str | None = None
    # The Hugging Face config object (architecture, sizes). Not compared: it is derived from the fields above.
    hf_config: Any = field(default=None, compare=False, repr=False)

    @property
    def architecture(self) -> str:
        return self.hf_config.architectures[0] if self.hf_config is not None else "unknown"


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # KV cache size. On CPU the pool is sized from ``cpu_kv_cache_bytes``; on GPU from free memory after a
    # profiling run times ``gpu_memory_utilization``. ``num_blocks`` overrides both (tests use it).
    num_blocks: int | None = None
    cpu_kv_cache_bytes: int = 1 << 29
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # "auto" (model dtype) | "fp8_e4m3"
    enable_prefix_caching: bool = True
    hash_algo: str = DEFAULT_HASH_ALGO
    hash_seed: int = DEFAULT_HASH_SEED
    # ZeroMQ address (e.g. "tcp://*:5557") where the engine core publishes its prefix cache's KV events and load
    # reports for routers (engine/kv_event_publisher.py); None: no events are recorded or published.
    kv_events_endpoint: str | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # the per-step token budget
    max_num_seqs: int = 128
    # Long prompts are split into chunks that fit the budget; when False a prompt must fit in one step.
    enable_chunked_prefill: bool = True
    # Schedule and launch step N+1 while the device runs step N (docs/engine.md). "auto": on for CUDA, with or
    # without a KV connector; True forces it (it also works on CPU, where there is nothing to overlap).
    async_scheduling: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.async_scheduling not in (True, False, "auto"):
            raise ValueError(f"async_scheduling must be True, False or 'auto', got {self.async_scheduling!r}")

    def use_async_scheduling(self, device_type: str) -> bool:
        """Resolve ``async_scheduling`` for the device the model runs on (a KV connector's scheduler half
        follows the steps one behind, as sampling does, so it makes no difference here)."""
        if self.async_scheduling == "auto":
            return device_type == "cuda"
        return bool(self.async_scheduling)


@dataclass(frozen=True)
class ParallelConfig:
    """How many devices one engine spans: ``tensor_parallel_size * pipeline_parallel_size`` ranks, one worker
    process each (engine/executor); 1 × 1 runs in the engine core's own process. ``data_parallel_size`` engine
    cores run behind one API server (``pdserve serve``, engine/async_engine/dp_client.py); an engine core itself
    refuses a size above 1."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            check_parallel_size(name, getattr(self, name))

    @property
    def world_size(self) -> int:
        """Ranks (devices) of one engine."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def check_parallel_size(name: str, value: Any) -> int:
    """``value`` if it is a positive integer; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:N"
    attention_backend: str = "auto"  # "auto" | "torch" | "triton"
    enforce_eager: bool = False  # no CUDA graphs
    # Decode batch sizes to capture CUDA graphs for (a larger batch is padded up to the next one; one above the
    # largest runs eagerly). None: the default ladder up to max_num_seqs (engine/worker/cuda_graphs.py).
    cuda_graph_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.cuda_graph_sizes is not None:
            sizes = tuple(self.cuda_graph_sizes)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 512 for s in sizes):
                raise ValueError(f"cuda_graph_sizes must be batch sizes from 1 to 512, got {self.cuda_graph_sizes!r}")
            object.__setattr__(self, "cuda_graph_sizes", tuple(sorted(set(sizes))))


@dataclass(frozen=True)
class KVTransferConfig:
    """Prefill/decode disaggregation: which connector moves KV blocks, and this engine's role."""

    role: str = "both"  # "both" | "prefill" | "decode"
    connector: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    # The deployment's secret (engine/security.py): authenticates KV calls, signs handles and stored blocks.
    # Set by the entry points (load_cluster_secret()); the built-in connectors refuse to start without it.
    cluster_secret: ClusterSecret | None = field(default=None, compare=False, repr=False)
    # The redis connector's password (PDSERVE_REDIS_PASSWORD, read by the entry points; never in the URL).
    redis_password: str | None = field(default=None, compare=False, repr=False)

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    # Speculative decoding (engine/spec_decode), or None. Build with ``speculative_config=`` (JSON, dict).
    speculative: SpeculativeConfig | None = None

    @classmethod
    def create(cls, model: str = DEFAULT_MODEL, **kwargs: Any) -> "EngineConfig":
        """Build a config from flat keyword arguments (the names of the sub-configs' fields).

        Resolves the model, so an unknown name or a missing directory fails here with a clear error.
        """
        from pdserve.engine.model_loader import resolve_model

        speculative = _speculative_config(kwargs.pop("speculative_config", None), kwargs)
        groups: dict[type, dict[str, Any]] = {c: {} for c in (ModelConfig, CacheConfig, SchedulerConfig,
                                                              ParallelConfig, DeviceConfig, KVTransferConfig)}
        for key, value in kwargs.items():
            if value is None:
                continue
            owner = next((c for c in groups if key in {f.name for f in dataclasses.fields(c)}), None)
            if owner is None:
                raise TypeError(f"unknown engine option {key!r}")
            groups[owner][key] = value
        parallel = ParallelConfig(**groups[ParallelConfig])  # refused before the model is resolved or loaded
        model_kw = groups[ModelConfig]
        load_format = model_kw.get("load_format", "auto")
        resolved = resolve_model(model, load_format)
        model_max = getattr(resolved.hf_config, "max_position_embeddings", 2048)
        max_model_len = model_kw.pop("max_model_len", None) or model_max
        if max_model_len > model_max:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context {model_max}")
        model_kw.setdefault("served_model_name", model)
        model_cfg = ModelConfig(model=model, max_model_len=max_model_len, path=resolved.path,
                                tokenizer_path=resolved.tokenizer_path, hf_config=resolved.hf_config, **model_kw)
        sched_kw = groups[SchedulerConfig]
        if parallel.world_size > 1:
            _check_parallel_fits(parallel, resolved.hf_config, groups)
        if not sched_kw.get("enable_chunked_prefill", True):
            sched_kw.setdefault("max_num_batched_tokens", max(max_model_len, 2048))
        graph_sizes = groups[DeviceConfig].get("cuda_graph_sizes")
        max_num_seqs = sched_kw.get("max_num_seqs", SchedulerConfig.max_num_seqs)
        if graph_sizes is not None and min(graph_sizes) > max_num_seqs:
            raise ValueError(f"cuda_graph_sizes {list(graph_sizes)}: none is at most max_num_seqs {max_num_seqs}, "
                             f"so no graph could ever run")
        return cls(model=model_cfg, cache=CacheConfig(**groups[CacheConfig]),
                   scheduler=SchedulerConfig(**sched_kw), parallel=parallel,
                   device=DeviceConfig(**groups[DeviceConfig]),
                   kv_transfer=KVTransferConfig(**groups[KVTransferConfig]), speculative=speculative)


def _check_parallel_fits(parallel: ParallelConfig, hf_config: Any, groups: dict[type, dict[str, Any]]) -> None:
    """Refuse, before any worker starts, a parallel layout the model or the other options cannot take."""
    from pdserve.engine.models.parallel_layers import ModelShard, heads_per_rank

    heads = hf_config.num_attention_heads
    heads_per_rank(heads, getattr(hf_config, "num_key_value_heads", None) or heads, parallel.tensor_parallel_size)
    ModelShard(pp_size=parallel.pipeline_parallel_size).layer_range(hf_config.num_hidden_layers)
    connector = groups[KVTransferConfig].get("connector")
    if connector and parallel.pipeline_parallel_size > 1:
        # A stage's ranks hold only some layers, and blocks travel with every layer: not done yet.
        raise ValueError("a KV connector (prefill/decode disaggregation) cannot be combined with pipeline "
                         "parallelism yet; run the prefill and decode engines with pipeline_parallel_size=1 "
                         "(tensor parallelism is supported)")
    if connector:
        from pdserve.engine.kv_transfer.registry import BUILTIN_CONNECTORS

        if connector not in BUILTIN_CONNECTORS:
            raise ValueError(f"the KV connector {connector!r} cannot run with tensor_parallel_size > 1: only the "
                             f"built-in connectors ({', '.join(BUILTIN_CONNECTORS)}) save and load per rank")
    if groups[SchedulerConfig].get("async_scheduling") is True:
        raise ValueError("async_scheduling cannot be used with tensor or pipeline parallelism yet")


def _speculative_config(value: Any, kwargs: dict[str, Any]) -> SpeculativeConfig | None:
    """Parse ``speculative_config`` and refuse it, before the model loads, on a prefill pod (it never decodes) and
    with parallel engines (the verification step runs in the engine core's own model runner)."""
    config = SpeculativeConfig.parse(value)
    if config is None:
        return None
    if kwargs.get("role") == "prefill":
        raise ValueError("speculative decoding is for engines that decode: a prefill pod never does, so "
                         "--speculative-config is refused with --role prefill (give it to the decode pods)")
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if (kwargs.get(name) or 1) > 1:
            raise ValueError(f"speculative decoding cannot be combined with {name} > 1 yet")
    return config
