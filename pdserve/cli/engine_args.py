"""Engine flags shared by every command that runs an engine (generate, serve, prefill, decode, bench)."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from pdserve.engine.config import DEFAULT_MODEL, check_parallel_size
from pdserve.engine.security import load_cluster_secret


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled short name, local Hugging Face directory, or shape preset with --load-format dummy")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="'dummy': random weights in the model's exact shapes")
    g.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--cuda-graph-sizes", type=_int_list, default=None,
                   help="decode batch sizes to capture CUDA graphs for, e.g. 1,8,32,64 (default: 1, 2, 4, 8, every "
                        "multiple of 16, up to --max-num-seqs); a larger batch runs eagerly")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from memory)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--cpu-kv-cache-gib", type=float, default=0.5, help="KV cache size on CPU")
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="per-step token budget")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the GPU runs this one (default: on for CUDA, prefill and "
                        "decode pods included)")
    g.add_argument("--speculative-config", default=None, type=_speculative_config,
                   help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        "(methods: ngram, draft_model, eagle, eagle3, medusa, oracle; see "
                        "docs/speculative-decoding.md); refused on prefill pods and with tensor/pipeline/data "
                        "parallelism")
    g.add_argument("--tensor-parallel-size", type=_parallel_size("tensor_parallel_size"), default=1,
                   help="devices per pipeline stage, each holding a slice of every layer's heads (one worker "
                        "process per device; not with a KV connector yet)")
    g.add_argument("--pipeline-parallel-size", type=_parallel_size("pipeline_parallel_size"), default=1,
                   help="pipeline stages per engine, each holding a contiguous range of layers (one batch in flight "
                        "at a time; not with a KV connector yet)")


def _int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


_int_list.__name__ = "int_list"


def positive_int(name: str) -> Callable[[str], int]:
    """An argparse type for a parallel size (``--data-parallel-size`` of ``pdserve serve`` too)."""
    return _parallel_size(name)


def _parallel_size(name: str) -> Callable[[str], int]:
    """An argparse type: an integer that :func:`check_parallel_size` accepts (a clear usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            return check_parallel_size(name, int(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) if text.strip().lstrip("-").isdigit()
                                             else f"invalid int value: {text!r}") from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _speculative_config(text: str) -> Any:
    """An argparse type: the flag's JSON, checked now (a clear usage error otherwise)."""
    from pdserve.engine.spec_decode.config import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_speculative_config.__name__ = "speculative_config"


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Flat keyword arguments for :meth:`EngineConfig.create` (plus ``model``)."""
    kw: dict[str, Any] = dict(
        model=args.model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.max_model_len,
        seed=args.seed, device=args.device, attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager, cuda_graph_sizes=getattr(args, "cuda_graph_sizes", None),
        block_size=args.block_size, num_blocks=args.num_blocks,
        kv_cache_dtype=args.kv_cache_dtype, gpu_memory_utilization=args.gpu_memory_utilization,
        cpu_kv_cache_bytes=int(args.cpu_kv_cache_gib * (1 << 30)), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        async_scheduling=getattr(args, "async_scheduling", None),  # None: "auto"
        speculative_config=getattr(args, "speculative_config", None))
    if args.served_model_name:
        kw["served_model_name"] = args.served_model_name
    secret = load_cluster_secret()
    if secret is not None:
        # The block-hash seed derives from the cluster secret: equal on every pod and the router, never sent, so
        # whoever reads a KV store or a handle cannot hash guessed prompts to test whether they were seen.
        kw["hash_seed"] = secret.hash_seed()
    return kw
