"""Executors: what runs the model for the engine core.

- One device (``tensor_parallel_size * pipeline_parallel_size == 1``): the core calls a
  :class:`~pdserve.engine.worker.model_runner.ModelRunner` in its own process, exactly as it always has.
- Several: :class:`~pdserve.engine.executor.multiproc.MultiProcExecutor` starts one worker process per rank and
  broadcasts each step to them through a shared-memory ring buffer (:mod:`pdserve.engine.executor.shm_queue`).

Both offer the runner's interface that the core uses: ``device``, ``vocab_size``, ``num_blocks``, ``kv_caches``
and ``execute_model(sched_out, sampled=None)``. A KV connector is attached to the runner
(``attach_kv_connector``), or, in parallel, runs in every rank (``build_kv_connector``, see ``kv_ranks``).
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.config import EngineConfig


def build_executor(config: EngineConfig) -> Any:
    """The model runner for one device, the multi-process executor for more."""
    par = config.parallel
    if par.tensor_parallel_size * par.pipeline_parallel_size == 1:
        from pdserve.engine.worker.model_runner import ModelRunner

        return ModelRunner(config)
    from pdserve.engine.executor.multiproc import MultiProcExecutor

    return MultiProcExecutor(config)
