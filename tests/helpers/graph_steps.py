"""The graph-runner tests' shared setup: a tiny model runner with prompts already prefilled, and steps run from one
saved KV cache (to compare a step's eager and graph paths)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.model_runner import ModelRunner
from tests.helpers.tiny_models import make_tiny_model


def prefilled_runner(directory: Path, tables: dict[str, list[int]]) -> tuple[ModelRunner, torch.Generator]:
    """An eager ModelRunner of a tiny Llama saved in ``directory`` (float32, Triton attention, 24 blocks of 16, on
    the GPU if there is one) after one step that prefilled random prompts of 20, 14 and 30 tokens for requests
    ``a``, ``b`` and ``c`` into ``tables``' blocks; also the generator that drew them, to draw more from."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = make_tiny_model("llama", directory)
    runner = ModelRunner(EngineConfig.create(model_dir, device=device, dtype="float32", num_blocks=24,
                                             block_size=16, attention_backend="triton", max_num_seqs=8,
                                             enforce_eager=True))
    g = torch.Generator().manual_seed(0)
    prompt = {r: torch.randint(3, 500, (n,), generator=g).tolist() for r, n in (("a", 20), ("b", 14), ("c", 30))}
    runner.execute_model(SchedulerOutput([ScheduledChunk(r, p, 0, tables[r], True) for r, p in prompt.items()]))
    return runner, g


def snapshot(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of every layer's KV cache, to restore with :func:`restore`."""
    return [c.clone() for c in caches]


def restore(caches: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Put the caches back to ``saved`` in place (graphs hold their addresses)."""
    for c, s in zip(caches, saved):
        c.copy_(s)


def each_step_from(runner, steps: list[list[ScheduledChunk]], saved: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``runner.execute_model`` of each step's chunks, every step starting from the caches in ``saved``. A
    generator: the caller checks a step's output before the next step runs (a graph replay's output may not
    outlive the next replay)."""
    for chunks in steps:
        restore(runner.kv_caches, saved)
        yield runner.execute_model(SchedulerOutput(chunks))
