"""The multi-process executor: one worker process per rank (``tensor × pipeline``), driven by the engine core.

```
engine core ──pickled SchedulerOutput──▶ broadcast ring (shared memory, written once) ──▶ every rank reads it
     ▲                                                                                     ranks: NCCL / gloo
     └──────── logits (raw float32 bytes) ◀── result ring (shared memory) ◀── output rank (tp 0, last stage)
```

The core keeps its scheduler and sampler; the logits come back to it and are sampled on its CPU (a multi-GPU
engine's sampling speed is its own issue). Supervision: a thread waits on every worker's process sentinel; when
one exits unexpectedly the others are terminated at once (no rank is left blocked in a collective), the reason is
recorded, and the core's next call -- or the wait it is in -- raises :class:`ExecutorFailedError`, which the engine
treats as fatal (:func:`pdserve.engine.faults.is_device_fault`).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import threading
from typing import Any

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import SchedulerOutput
from pdserve.engine.executor.shm_queue import ShmRingBuffer
from pdserve.engine.executor.worker import KVPoll, WorkerArgs, decode_result, run_worker

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 3.0  # a terminated worker gets this long before it is killed


class ExecutorFailedError(RuntimeError):
    """A worker process died (or failed): the engine cannot run another step."""


class MultiProcExecutor:
    """Starts and supervises the workers; :meth:`execute_model` runs one step on all of them.

    Offers what the engine core uses of a :class:`~pdserve.engine.worker.model_runner.ModelRunner`:
    ``device`` (where logits arrive: the CPU), ``vocab_size``, ``num_blocks``, ``kv_caches`` (None: the cache
    lives in the workers) and :meth:`execute_model`.
    """

    kv_caches = None

    def __init__(self, config: EngineConfig) -> None:
        par = config.parallel
        self.tp_size, self.pp_size = par.tensor_parallel_size, par.pipeline_parallel_size
        self.world_size = self.tp_size * self.pp_size
        self.device = torch.device("cpu")
        _check_devices(config.device.device, self.world_size)
        self._failure: str | None = None
        self._closing = False
        sched, vocab = config.scheduler, config.model.hf_config.vocab_size
        self._broadcast = ShmRingBuffer(self.world_size, num_slots=4, capacity=_broadcast_capacity(config))
        # One step is in flight at a time: one slot, sized for the largest logits (float32, every row sampled).
        self._results = ShmRingBuffer(1, num_slots=1, capacity=sched.max_num_seqs * vocab * 4 + (1 << 16))
        ctx = multiprocessing.get_context("spawn")  # CUDA and torch.distributed do not survive a fork
        port = _free_port()
        self._procs: list[Any] = []
        self._errors: list[Any] = []
        for rank in range(self.world_size):
            args = WorkerArgs(rank=rank, tp_size=self.tp_size, pp_size=self.pp_size, config=config, dist_port=port,
                              broadcast=self._broadcast.handle(), results=self._results.handle(),
                              parent_pid=os.getpid(), log_level=logging.getLogger().getEffectiveLevel())
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_worker, args=(args, sender), name=f"pdserve-worker-{rank}", daemon=True)
            proc.start()
            sender.close()
            self._procs.append(proc)
            self._errors.append(receiver)
        atexit.register(self.shutdown)
        self._watcher = threading.Thread(target=self._watch, name="executor-watch", daemon=True)
        self._watcher.start()
        ready, _ = decode_result(self._results.read(0, on_idle=self._check))
        self.num_blocks: int = ready["num_blocks"]
        self.vocab_size: int = ready["vocab_size"]
        self._kv_infos = ready.get("kv_infos")  # each rank's KV connector (kv_ranks.RankKVInfo), or None
        self._config = config
        logger.info("%d workers ready (tensor %d x pipeline %d), pids %s", self.world_size, self.tp_size,
                    self.pp_size, [p.pid for p in self._procs])

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def execute_model(self, sched_out: SchedulerOutput, sampled: Any = None) -> torch.Tensor:
        """Run one step on every rank; float32 logits ``[S, V]`` on the CPU, as the model runner returns them."""
        if sampled is not None:
            raise ValueError("the multi-process executor runs without asynchronous scheduling")
        self._check()
        self._broadcast.write(pickle.dumps(sched_out, protocol=pickle.HIGHEST_PROTOCOL), on_idle=self._check)
        meta, logits = decode_result(self._results.read(0, on_idle=self._check))
        if meta["kind"] != "logits" or logits is None:
            raise ExecutorFailedError(f"unexpected result from the output rank: {meta}")
        return logits

    def build_kv_connector(self) -> tuple[Any, Any]:
        """The KV connector's scheduler half and the stand-in for the ranks' worker halves, which every rank
        started on its own cache (see :mod:`pdserve.engine.executor.kv_ranks`)."""
        from pdserve.engine.executor.kv_ranks import build_parallel_connector

        if not self._kv_infos:
            raise ValueError("the workers were started without a KV connector")
        return build_parallel_connector(self._config, self._kv_infos, self.poll_kv)

    def poll_kv(self, meta: Any = None) -> list[Any]:
        """Every rank's KV connector report (``kv_ranks.RankKVReport``), after starting ``meta``'s loads."""
        self._check()
        self._broadcast.write(pickle.dumps(KVPoll(meta), protocol=pickle.HIGHEST_PROTOCOL), on_idle=self._check)
        reply, _ = decode_result(self._results.read(0, on_idle=self._check))
        if reply["kind"] != "kv":
            raise ExecutorFailedError(f"unexpected result from the output rank: {reply}")
        return reply["reports"]

    def check_health(self) -> None:
        """Raise :class:`ExecutorFailedError` if a worker died (the core calls this while idle, too)."""
        self._check()

    def shutdown(self) -> None:
        """Stop every worker (asking first, then terminating) and free the shared memory. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._failure is None and all(p.is_alive() for p in self._procs):
            try:
                self._broadcast.write(pickle.dumps(None), on_idle=self._check)
            except Exception:
                pass
            for proc in self._procs:
                proc.join(timeout=_STOP_GRACE_S)
        self._stop_workers()
        for queue in (self._broadcast, self._results):
            queue.close()
        atexit.unregister(self.shutdown)

    # ------------------------------------------------------------------ supervision
    def _check(self) -> None:
        if self._failure is not None:
            raise ExecutorFailedError(self._failure)

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._procs)}
        done = multiprocessing.connection.wait(list(sentinels))
        if self._closing:
            return
        rank = sentinels[done[0]]
        proc = self._procs[rank]
        proc.join(timeout=1.0)
        self._stop_workers()  # the others may be blocked in a collective with the dead rank: end them now
        how = (f"was killed by signal {-proc.exitcode}" if proc.exitcode is not None and proc.exitcode < 0
               else f"exited with code {proc.exitcode}")
        messages = [f"rank {r}: {msg}" for r, msg in self._error_messages()]
        self._failure = (f"worker rank {rank} (pid {proc.pid}) {how}; the engine cannot continue"
                         + (f" ({'; '.join(messages)})" if messages else ""))
        logger.error("%s", self._failure)

    def _error_messages(self) -> list[tuple[int, str]]:
        found = []
        for rank, conn in enumerate(self._errors):
            try:
                if conn.poll():
                    found.append((rank, conn.recv()))
            except (EOFError, OSError):
                pass
        return found

    def _stop_workers(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=_STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=_STOP_GRACE_S)


def _check_devices(device: str, world_size: int) -> None:
    """One GPU per rank: refuse before spawning if there are too few (device_count creates no CUDA context)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    if device not in ("auto", "cuda"):
        raise ValueError(f"with tensor or pipeline parallelism rank i runs on cuda:i: pass --device cuda (or auto), "
                         f"not {device!r}")
    if torch.cuda.device_count() < world_size:
        raise ValueError(f"tensor x pipeline = {world_size} ranks need {world_size} GPUs, "
                         f"found {torch.cuda.device_count()}")


def _broadcast_capacity(config: EngineConfig) -> int:
    """Room for the largest scheduler output: the step's tokens plus every sequence's whole block table, pickled
    (under 10 bytes an integer), with slack for ids and framing."""
    sched, cache = config.scheduler, config.cache
    blocks_per_seq = -(-config.model.max_model_len // cache.block_size) + 1
    ints = sched.max_num_batched_tokens + sched.max_num_seqs * blocks_per_seq
    return 10 * ints + 512 * sched.max_num_seqs + (1 << 20)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
