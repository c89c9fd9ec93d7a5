"""The graph-runner tests' shared setup: tiny model runners (one with prompts already prefilled, one for the CPU
wiring tests, given the decode graphs a GPU runner would have), and steps run from one saved KV cache (to compare a
step's eager and graph paths)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.worker.cuda_graphs import DecodeGraphRunner
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


# The wiring tests' engine shape: the config of :func:`wiring_runner` and the decode graphs of
# :func:`attach_decode_graphs` agree on it.
WIRING = dict(num_blocks=16, block_size=16, max_num_seqs=4, max_model_len=256)


def wiring_runner(directory: Path, **config) -> ModelRunner:
    """A CPU ModelRunner of a tiny Qwen3 saved in ``directory`` (float32, Triton attention in the interpreter, the
    :data:`WIRING` shape), eager as on any CPU; ``config``: more EngineConfig settings."""
    model_dir = make_tiny_model("qwen3", directory)
    return ModelRunner(EngineConfig.create(model_dir, device="cpu", dtype="float32", attention_backend="triton",
                                           **WIRING, **config))


def attach_decode_graphs(runner: ModelRunner) -> None:
    """Give a :func:`wiring_runner` the decode graph runner a GPU runner builds (on CPU its capture only writes the
    static buffers), so that the verify and mixed-step graph runners made next share its rows as on a GPU."""
    runner.graph_runner = DecodeGraphRunner(runner.model, runner.kv_caches, device=runner.device, **WIRING)
    runner.graph_runner.capture()


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
