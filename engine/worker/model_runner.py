"""The model runner: owns the model and its KV cache, and runs one scheduled step at a time."""

from __future__ import annotations

import logging
import os

import torch

from pdserve.engine import prompt_logprobs
from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.model_loader import load_model, resolve_device, resolve_dtype
from pdserve.engine.models.parallel_layers import ModelShard
from pdserve.engine.worker.attention import get_attention_backend
from pdserve.engine.worker.cuda_graphs import DecodeGraphRunner, capture_sizes
from pdserve.engine.worker.mixed_graphs import MixedGraphRunner, mixed_capture_sizes, mixed_graph_top
from pdserve.engine.worker.verify_graphs import VerifyGraphRunner
from pdserve.engine.worker.verify_layout import verify_capture_sizes
from pdserve.engine.worker.warmup import warm_up, warmup_cases
from pdserve.engine.worker.input_batch import SampledTokens, build_inputs, small_tensor_to
from pdserve.engine.worker.kv_cache import (
    allocate_kv_caches,
    gpu_kv_cache_bytes,
    kv_cache_spec,
    num_blocks_for_bytes,
    shard_kv_spec,
)

logger = logging.getLogger(__name__)


class ModelRunner:
    """Loads the model (dtype ``"auto"``: float32 on CPU, bfloat16 on CUDA), sizes and allocates the paged KV
    cache, and turns each :class:`SchedulerOutput` into logits.

    Public attributes: ``device``, ``dtype``, ``model``, ``vocab_size``, ``num_blocks``, ``block_size``,
    ``kv_spec`` and ``kv_caches`` (one ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer, for connectors).
    """

    def __init__(self, config: EngineConfig, shard: ModelShard | None = None) -> None:
        """``shard``: this rank's part of a tensor/pipeline-parallel model (the multi-process executor's workers,
        :mod:`pdserve.engine.executor`); None for the whole model on one device."""
        self.config = config
        self.shard = shard
        self.device = resolve_device(config.device.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        hf_config = config.model.hf_config
        self.vocab_size: int = hf_config.vocab_size
        self.kv_spec = kv_cache_spec(hf_config, self.block_size, self.dtype, config.cache.kv_cache_dtype)
        if shard is not None:  # this rank's KV heads of this stage's layers
            self.kv_spec = shard_kv_spec(self.kv_spec, hf_config, shard)
        self.attn_backend = get_attention_backend(config.device.attention_backend, self.device,
                                                  self.kv_spec.head_dim, self.block_size)
        self.model = load_model(config.model, self.device, self.dtype, self.attn_backend, shard=shard)
        self.kv_connector = None  # a KV connector's worker half (engine/kv_transfer), see attach_kv_connector
        # The last step's prompt logprobs (engine/prompt_logprobs.py): request id -> (start_pos, rows).
        self.prompt_logprobs_output: dict[str, tuple[int, list]] = {}
        # Hidden states for EAGLE / Medusa proposers (see capture_hidden_states); None: nothing is kept. Set
        # before the profiling run, which runs a step.
        self.hidden_capture: str | tuple[int, ...] | None = None
        self.last_hidden: torch.Tensor | None = None
        # Cleared by the speculative decoder while adaptive k proposes nothing: no copy of the hidden states then.
        self.keep_hidden = True
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = allocate_kv_caches(self.kv_spec, self.num_blocks, self.device)
        if self.device.type == "cuda" and self.attn_backend.triton_kernels:
            self._warm_up_kernels()
        self.graph_runner = self._make_graph_runner()
        self.verify_graph_runner = self._make_verify_graph_runner()
        self.mixed_graph_runner = self._make_mixed_graph_runner()
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s, backend %s)", self.num_blocks,
                    self.block_size, self.num_blocks * self.kv_spec.bytes_per_block / 2**30, self.kv_spec.dtype,
                    self.attn_backend.name)

    @torch.inference_mode()
    def execute_model(self, sched_out: SchedulerOutput, sampled: SampledTokens | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits ``[S, V]``, one row per chunk with ``sample`` set, in chunk
        order. Writes the step's K/V into the cache slots of each chunk's block table.

        Asynchronous scheduling: placeholder input tokens are filled on the device from ``sampled``, the
        previous step's sampled ids. Nothing here waits for the device, so the call returns while it still runs.

        With a KV connector: its loads start before the forward pass, each layer's KV is handed to it as soon as
        the layer wrote it (hooks, see :meth:`attach_kv_connector`), and its saves are started before returning.
        """
        connector = self.kv_connector
        if connector is not None:
            connector.bind_connector_metadata(sched_out.kv_connector_metadata)
            connector.start_load_kv()
        self.prompt_logprobs_output = {}
        if self.graph_runner is not None:
            self.graph_runner.release(sched_out.finished_request_ids, sched_out.preempted_request_ids)
            # A graph returns only the sampled rows' logits; prompt logprobs need every prompt position's.
            size = None if sched_out.prompt_logprobs else self.graph_runner.padded_size(sched_out.chunks)
            logits = None
            if size is not None:
                logits = self._run_graph(sched_out, size, sampled)
            elif self.verify_graph_runner is not None and not sched_out.prompt_logprobs:
                verify_size = self.verify_graph_runner.padded_size(sched_out.chunks)
                if verify_size is not None:
                    logits = self._run_verify_graph(sched_out, verify_size)
            if logits is None and self._mixed_graph_allowed(sched_out):
                mixed_size = self.mixed_graph_runner.padded_size(sched_out.chunks)
                if mixed_size is not None:
                    logits = self._run_mixed_graph(sched_out, mixed_size, sampled)
            if logits is not None:
                if connector is not None:
                    connector.wait_for_save()  # a replay runs no hooks: this stages every layer it must save
                return logits
        logits = self._run(sched_out, self.kv_caches, sampled)
        if connector is not None:
            connector.wait_for_save()
        return logits

    def capture_hidden_states(self, what: str | tuple[int, ...]) -> None:
        """Keep each step's hidden states in ``last_hidden``: one row per token of the step, in chunk order.

        ``"last"``: the final (normed) hidden state, ``[T, D]``, what EAGLE-1 and Medusa heads read; it is the
        tensor the forward pass returns anyway, so this costs nothing. A tuple of layer indices (EAGLE-3): the
        residual stream entering each of those layers, concatenated, ``[T, len * D]``; decode CUDA graphs are
        dropped then (their outputs are the final hidden states only), so every step runs eagerly.
        """
        if self.shard is not None:
            raise ValueError("EAGLE and Medusa proposers need a single-device model runner")
        self.hidden_capture = what
        if isinstance(what, tuple):
            inner = getattr(self.model, "model", None)
            if inner is None or not hasattr(inner, "aux_hidden_layers"):
                raise ValueError(f"{type(self.model).__name__} cannot expose intermediate hidden states")
            num_layers = len(inner.layers)
            bad = [i for i in what if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"auxiliary hidden-state layers {bad} are outside the target's {num_layers} layers")
            inner.aux_hidden_layers = what
            self.graph_runner = None
            self.verify_graph_runner = None  # its graphs, too, return the final hidden states only
            self.mixed_graph_runner = None

    def attach_kv_connector(self, connector) -> None:
        """Drive a KV connector's worker half from now on (after the profiling run, on the real cache).

        Forward hooks on the decoder layers let the connector wait for a layer's loaded KV before the layer runs
        and save the layer's KV right after it ran, so transfers overlap the rest of the forward pass.
        """
        self.kv_connector = connector
        layers = getattr(getattr(self.model, "model", self.model), "layers", None)
        if layers is None:
            return  # no per-layer hooks: wait_for_save stages every layer after the forward pass
        # The hooks hold the connector and the layer's cache tensor, not the runner: a runner -> model -> hook ->
        # runner cycle kept every engine's weights in memory after the engine was dropped (measured: 540 MB a
        # SmolLM2 engine, never returned).
        for i, (layer, kv_cache) in enumerate(zip(layers, self.kv_caches)):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: connector.wait_for_layer_load(i))
            layer.register_forward_hook(lambda _m, _a, _o, i=i, kv=kv_cache: connector.save_kv_layer(i, kv))

    @torch.inference_mode()
    def _warm_up_kernels(self) -> None:
        """Compile the Triton kernel variants eager steps use now, not in the middle of serving."""
        spec, sched = self.kv_spec, self.config.scheduler
        tp_size = self.shard.tp_size if self.shard is not None else 1
        group = self.config.model.hf_config.num_attention_heads // tp_size // spec.num_kv_heads
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        cases = warmup_cases(group, spec.num_kv_heads, num_sms, sched.max_num_seqs, sched.max_num_batched_tokens)
        dense = getattr(self.attn_backend, "dense_prefill", None)
        if dense is not None and dense.enabled:
            # cuDNN prefill (PDSERVE_DENSE_PREFILL): one fresh prompt at the threshold makes the first call, which
            # builds every prompt-length bucket's graph now instead of in live traffic (dense_prefill.py).
            longest = min(sched.max_num_batched_tokens, self.config.model.max_model_len)
            dense.limit(longest)
            if dense.min_tokens <= longest:
                cases.append((1, dense.min_tokens, 0))
        warm_up(lambda out: self._run(out, self.kv_caches), cases, self.block_size, self.num_blocks)

    def _make_graph_runner(self) -> DecodeGraphRunner | None:
        """CUDA graphs of the decode step: on CUDA with the Triton backend, unless ``enforce_eager``."""
        if self.device.type != "cuda" or self.config.device.enforce_eager or not self.attn_backend.triton_kernels:
            return None
        runner = DecodeGraphRunner(self.model, self.kv_caches, max_num_seqs=self.config.scheduler.max_num_seqs,
                                   max_model_len=self.config.model.max_model_len, block_size=self.block_size,
                                   num_blocks=self.num_blocks, device=self.device,
                                   sizes=self.config.device.cuda_graph_sizes)
        runner.capture()
        return runner

    def _make_verify_graph_runner(self) -> VerifyGraphRunner | None:
        """CUDA graphs of speculative verify steps (``docs/speculative-decoding.md``): wherever decode graphs are
        captured and the engine speculates, unless ``PDSERVE_VERIFY_CUDA_GRAPHS=0`` (then verify steps run
        eagerly, as with ``enforce_eager``; for A/B measurements)."""
        spec = self.config.speculative
        if self.graph_runner is None or spec is None:
            return None
        if os.environ.get("PDSERVE_VERIFY_CUDA_GRAPHS", "1") == "0":
            logger.info("PDSERVE_VERIFY_CUDA_GRAPHS=0: speculative verify steps run eagerly")
            return None
        max_num_seqs = self.config.scheduler.max_num_seqs
        sizes = verify_capture_sizes(capture_sizes(max_num_seqs), max_num_seqs,
                                     spec.disable_by_batch_size if spec.adaptive else None)
        runner = VerifyGraphRunner(self.model, self.kv_caches, self.graph_runner.rows, sizes=sizes,
                                   num_speculative_tokens=spec.num_speculative_tokens,
                                   max_model_len=self.config.model.max_model_len, block_size=self.block_size,
                                   num_blocks=self.num_blocks, device=self.device, pool=self.graph_runner.pool)
        return _capture_or_explain(runner, "the speculative verify", "PDSERVE_VERIFY_CUDA_GRAPHS=0 runs verify steps")

    def _make_mixed_graph_runner(self) -> MixedGraphRunner | None:
        """CUDA graphs of steps with prompt chunks (``engine/worker/mixed_graphs.py``): wherever decode graphs are
        captured, unless ``PDSERVE_MIXED_CUDA_GRAPHS=0`` (then such steps run eagerly; for A/B measurements).
        ``PDSERVE_MIXED_CUDA_GRAPHS=N`` (N > 1) raises the ladder's top from 512 to ``N`` tokens."""
        if self.graph_runner is None:
            return None
        top = mixed_graph_top(os.environ.get("PDSERVE_MIXED_CUDA_GRAPHS", "1"))
        if top == 0:
            logger.info("PDSERVE_MIXED_CUDA_GRAPHS=0: steps with prompt chunks run eagerly")
            return None
        sched = self.config.scheduler
        runner = MixedGraphRunner(self.model, self.kv_caches, self.graph_runner.rows,
                                  sizes=mixed_capture_sizes(sched.max_num_batched_tokens, top),
                                  max_num_seqs=sched.max_num_seqs, max_model_len=self.config.model.max_model_len,
                                  block_size=self.block_size, num_blocks=self.num_blocks, device=self.device,
                                  pool=self.graph_runner.pool)
        return _capture_or_explain(runner, "the mixed-step",
                                   "PDSERVE_MIXED_CUDA_GRAPHS=0 runs steps with prompt chunks")

    def _mixed_graph_allowed(self, sched_out: SchedulerOutput) -> bool:
        """A mixed graph may run this step: graphs exist, no prompt logprobs are wanted (they need every prompt
        position's logits), and a KV connector, if any, copes with a replay, which runs no layer hooks: no load
        starts in the step (no layer could wait for its loaded KV) and the worker saves the layers no hook
        reported (``saves_unreported_layers``)."""
        if self.mixed_graph_runner is None or sched_out.prompt_logprobs:
            return False
        connector = self.kv_connector
        if connector is None:
            return True
        meta = sched_out.kv_connector_metadata
        return getattr(connector, "saves_unreported_layers", False) and (meta is None or not meta.loads)

    def _run_mixed_graph(self, sched_out: SchedulerOutput, size: int,
                         sampled: SampledTokens | None) -> torch.Tensor:
        hidden, rows, num_tokens = self.mixed_graph_runner.run(sched_out.chunks, size, sampled)  # [size, D]
        if self.hidden_capture is not None and self.keep_hidden:  # "last" (aux layers drop the graphs)
            self.last_hidden = hidden[:num_tokens].clone()  # the next replay overwrites the graph's output
        return self.model.compute_logits(hidden.index_select(0, rows)).float()  # [S, V]

    def _run_verify_graph(self, sched_out: SchedulerOutput, size: int) -> torch.Tensor:
        hidden, rows = self.verify_graph_runner.run(sched_out.chunks, size)  # [size * (k + 1), D], [S]
        self.last_hidden = None
        if self.hidden_capture is not None and self.keep_hidden:  # "last" (aux layers drop the graphs)
            # The step's tokens are the graph's first rows, packed chunk after chunk (verify_layout.py); the next
            # replay overwrites them.
            self.last_hidden = hidden[:sum(c.num_tokens for c in sched_out.chunks)].clone()
        # Logits of every row, then the wanted ones: the LM head's matmul keeps one shape per graph size (see
        # engine/worker/verify_graphs.py).
        return self.model.compute_logits(hidden).index_select(0, rows).float()  # [S, V]

    def _run_graph(self, sched_out: SchedulerOutput, size: int, sampled: SampledTokens | None) -> torch.Tensor:
        hidden = self.graph_runner.run(sched_out.chunks, size, sampled)  # [B, D]
        self.last_hidden = None
        if self.hidden_capture is not None and self.keep_hidden:  # the next replay overwrites the graph's output
            self.last_hidden = hidden.clone()
        if not all(c.sample for c in sched_out.chunks):
            hidden = hidden[small_tensor_to([i for i, c in enumerate(sched_out.chunks) if c.sample], torch.long,
                                            self.device)]
        return self.model.compute_logits(hidden).float()  # [S, V]

    def _run(self, sched_out: SchedulerOutput, kv_caches: list[torch.Tensor],
             sampled: SampledTokens | None = None) -> torch.Tensor:
        inputs = build_inputs(sched_out, self.block_size, self.device, num_blocks=kv_caches[0].shape[1],
                              sampled=sampled)
        md = inputs.attn_metadata
        hidden = self.model(inputs.input_ids, inputs.positions, kv_caches, md)  # [T, D]
        self.last_hidden = None
        if self.hidden_capture is not None and self.keep_hidden:
            self.last_hidden = hidden if self.hidden_capture == "last" else torch.cat(
                self.model.model.aux_hidden_states, dim=-1)
        if sched_out.prompt_logprobs:  # only steps with requests that asked: logits of their prompt positions
            self.prompt_logprobs_output = prompt_logprobs.compute(
                self.model.compute_logits, hidden, sched_out, md.query_start_loc_cpu, sched_out.prompt_logprobs)
        return self.model.compute_logits(hidden[md.logits_indices]).float()  # [S, V]

    # ------------------------------------------------------------------ KV cache sizing
    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return num_blocks_for_bytes(self.kv_spec, cache.cpu_kv_cache_bytes)
        self.profile_run()
        budget = gpu_kv_cache_bytes(self.device, cache.gpu_memory_utilization)
        if budget <= 0:
            raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                             f"{cache.gpu_memory_utilization}: the model and its activations take it all")
        return num_blocks_for_bytes(self.kv_spec, budget)

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward pass at the largest step the scheduler can build: its token budget, spread as one long
        prefill plus single-token rows up to ``max_num_seqs``, every row sampled (so the logits are at their
        largest too). Its peak memory is what the KV cache must leave room for."""
        sched = self.config.scheduler
        num_tokens = sched.max_num_batched_tokens
        num_seqs = max(1, min(sched.max_num_seqs, num_tokens))
        long_len = max(1, min(num_tokens - (num_seqs - 1), self.config.model.max_model_len))
        bs = self.block_size
        long_blocks = (long_len + bs - 1) // bs
        chunks = [ScheduledChunk(f"profile-{i}", [0], 0, [long_blocks + i], True) for i in range(num_seqs - 1)]
        chunks.append(ScheduledChunk("profile-long", [0] * long_len, 0, list(range(long_blocks)), True))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the peak from here on: weights + this step
        scratch = allocate_kv_caches(self.kv_spec, long_blocks + num_seqs - 1, self.device)
        self._run(SchedulerOutput(chunks=chunks), scratch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        del scratch
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _capture_or_explain(runner, what: str, switch_off: str):
    """``runner.capture()``, or a RuntimeError naming the graphs and the switch that runs their steps eagerly."""
    try:
        runner.capture()
    except Exception as exc:
        raise RuntimeError(f"capturing {what} CUDA graphs failed ({exc}); {switch_off} eagerly instead") from exc
    return runner
