"""Runs batches of prompts through the model once (prefill only) and pools their final hidden states.

The model, its attention backend and its paged KV cache are the generate runner's own
(:class:`~pdserve.engine.worker.model_runner.ModelRunner`); only the step differs: every token of every prompt is
computed (no prefix-cache hits: the hidden states of cached tokens are not kept, and a pooled vector needs all of
them), the hidden states of all positions are kept instead of one logits row, and the blocks a batch used are
free again as soon as the batch returns (nothing outlives a step).
"""

from __future__ import annotations

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.pooling.pooler import pool
from pdserve.engine.worker.input_batch import build_inputs
from pdserve.engine.worker.model_runner import ModelRunner


class PoolingRunner:
    """Embeds token-id prompts: ``embed(prompts) -> float32 [N, D]`` (see :func:`~.pooler.pool`)."""

    def __init__(self, config: EngineConfig, pooling_type: str = "mean", normalize: bool = True) -> None:
        pool(torch.zeros(1, 1), [1], pooling_type)  # refuse an unknown pooling type before loading the model
        self.config = config
        self.pooling_type = pooling_type
        self.normalize = normalize
        self.runner = ModelRunner(config)
        self.block_size = self.runner.block_size
        self.num_blocks = self.runner.num_blocks
        self.hidden_size = int(config.model.hf_config.hidden_size)
        self.max_batch_tokens = max(config.scheduler.max_num_batched_tokens, 1)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        """Pooled vectors of ``prompts`` (each within the model's context), in order, as float32 on the CPU.

        Prompts are packed into steps of at most the scheduler's token budget and the KV cache's blocks (a
        longer prompt runs in a step of its own)."""
        out: list[torch.Tensor | None] = [None] * len(prompts)
        batch: list[int] = []
        tokens = blocks = 0
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError("a prompt to embed must hold at least one token")
            need = self.blocks_for(len(p))
            if need > self.num_blocks:
                raise ValueError(f"a prompt of {len(p)} tokens needs {need} KV blocks; the cache has "
                                 f"{self.num_blocks}")
            if batch and (tokens + len(p) > self.max_batch_tokens or blocks + need > self.num_blocks):
                self._run(prompts, batch, out)
                batch, tokens, blocks = [], 0, 0
            batch.append(i)
            tokens += len(p)
            blocks += need
        if batch:
            self._run(prompts, batch, out)
        return torch.stack(out)  # type: ignore[arg-type]

    def _run(self, prompts: list[list[int]], batch: list[int], out: list[torch.Tensor | None]) -> None:
        # One-token prompts first: the step's contract puts single-token ("decode") rows before longer ones.
        order = sorted(batch, key=lambda i: len(prompts[i]) != 1)
        chunks, next_block = [], 0
        for i in order:
            need = self.blocks_for(len(prompts[i]))
            chunks.append(ScheduledChunk(f"pool-{i}", list(prompts[i]), 0,
                                         list(range(next_block, next_block + need)), False))
            next_block += need
        runner = self.runner
        inputs = build_inputs(SchedulerOutput(chunks=chunks), self.block_size, runner.device,
                              num_blocks=self.num_blocks)
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn_metadata)
        pooled = pool(hidden, [len(prompts[i]) for i in order], self.pooling_type, self.normalize).cpu()
        for row, i in enumerate(order):
            out[i] = pooled[row]
