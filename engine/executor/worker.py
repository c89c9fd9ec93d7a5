"""One rank of a parallel engine: a process that owns one device's part of the model.

Each worker joins the process group (NCCL between GPUs with a gloo group beside it for CPU-side agreement; gloo
alone on CPU), builds its shard of the model and of the KV cache, then loops: read the step from the broadcast
queue, run it, and -- on the output rank, tensor rank 0 of the last pipeline stage -- write the logits to the
result queue. The engine core (:mod:`pdserve.engine.executor.multiproc`) supervises the workers.

Any exception ends the worker (after sending its text to the core): a rank that left a collective half-done
cannot be resynchronised with the others, so the engine goes down with that error instead of hanging.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import struct
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.core.sched_output import SchedulerOutput
from pdserve.engine.executor.kv_ranks import build_rank_connector, rank_info, rank_report
from pdserve.engine.executor.shm_queue import ShmRingBuffer
from pdserve.engine.models.parallel_layers import ModelShard
from pdserve.engine.worker.input_batch import SampledTokens, build_inputs
from pdserve.engine.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")  # length of the pickled header that precedes a result's raw tensor bytes


@dataclass(frozen=True)
class KVPoll:
    """A broadcast message besides steps: report the KV connector's progress (after starting ``meta``'s loads,
    for an idle step that had no forward pass to carry them)."""

    meta: Any = None


@dataclass(frozen=True)
class WorkerArgs:
    """What the core hands each worker process (all picklable)."""

    rank: int
    tp_size: int
    pp_size: int
    config: EngineConfig
    dist_port: int
    broadcast: tuple[int, int, int, str]  # ShmRingBuffer.handle()
    results: tuple[int, int, int, str]
    parent_pid: int
    log_level: int

    @property
    def output_rank(self) -> int:
        """Tensor rank 0 of the last stage: it holds the (gathered) logits."""
        return (self.pp_size - 1) * self.tp_size


def encode_result(kind: str, tensor: torch.Tensor | None = None, **fields: Any) -> tuple[bytes, ...]:
    """A result message: a small pickled header, then a tensor's raw bytes (never pickled)."""
    meta = {"kind": kind, **fields}
    if tensor is None:
        header = pickle.dumps(meta)
        return _HEADER.pack(len(header)), header
    tensor = tensor.detach().to("cpu").contiguous()
    meta.update(shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
    header = pickle.dumps(meta)
    return _HEADER.pack(len(header)), header, memoryview(tensor.view(torch.uint8).numpy())


def decode_result(data: bytes) -> tuple[dict[str, Any], torch.Tensor | None]:
    (size,) = _HEADER.unpack_from(data)
    meta = pickle.loads(data[_HEADER.size:_HEADER.size + size])
    if "shape" not in meta:
        return meta, None
    body = bytearray(data[_HEADER.size + size:])
    tensor = torch.frombuffer(body, dtype=getattr(torch, meta["dtype"])) if body else torch.empty(0)
    return meta, tensor.view(meta["shape"])


class StageRunner(ModelRunner):
    """The model runner of one rank: its shard of the model, the KV cache of its heads and layers, and the hand-off
    of intermediate activations between pipeline stages.

    Pipeline parallelism runs one batch at a time: stage ``i + 1`` waits for stage ``i`` (no micro-batches yet).
    """

    def __init__(self, config: EngineConfig, shard: ModelShard, rank: int, cpu_group: Any) -> None:
        self.rank, self.cpu_group = rank, cpu_group
        super().__init__(config, shard)

    def _run(self, sched_out: SchedulerOutput, kv_caches: list[torch.Tensor],
             sampled: SampledTokens | None = None) -> torch.Tensor | None:
        shard = self.shard
        assert shard is not None
        if shard.pp_size == 1:
            return super()._run(sched_out, kv_caches, sampled)
        inputs = build_inputs(sched_out, self.block_size, self.device, num_blocks=kv_caches[0].shape[1],
                              sampled=sampled)
        md = inputs.attn_metadata
        intermediate = None
        if not shard.is_first_stage:  # every rank of a stage receives from its peer of the previous stage
            shape = (inputs.input_ids.shape[0], self.config.model.hf_config.hidden_size)
            x, residual = (torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2))
            source = self.rank - shard.tp_size
            torch.distributed.recv(x, source)
            torch.distributed.recv(residual, source)
            intermediate = (x, residual)
        out = self.model(inputs.input_ids, inputs.positions, kv_caches, md, intermediate)
        if not shard.is_last_stage:
            for tensor in out:
                torch.distributed.send(tensor.contiguous(), self.rank + shard.tp_size)
            return None
        return self.model.compute_logits(out[md.logits_indices]).float()  # [S, V]

    def _decide_num_blocks(self) -> int:
        """Every rank must offer the same block ids: the smallest pool any rank can hold."""
        local = torch.tensor([super()._decide_num_blocks()], dtype=torch.int64)
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MIN, group=self.cpu_group)
        return int(local.item())

    def _make_graph_runner(self):
        """CUDA graphs capture the decode step of a whole model (tensor parallel: its all-reduces too); a pipeline
        stage's step sends and receives between ranks, which stays eager."""
        if self.shard is not None and self.shard.pp_size > 1:
            return None
        return super()._make_graph_runner()


def run_worker(args: WorkerArgs, error_conn: Any) -> None:
    """Process entry point of one rank (see the module docstring)."""
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s %(levelname)s [rank {args.rank}] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine core decides when workers stop
    broadcast = results = kv = None
    try:
        runner = _start(args)
        kv = _start_kv_connector(args, runner)
        is_output = args.rank == args.output_rank
        kv_infos = _gather(runner, args, rank_info(kv) if kv is not None else None)
        broadcast = ShmRingBuffer.attach(args.broadcast)
        if is_output:
            results = ShmRingBuffer.attach(args.results)
            results.write(*encode_result("ready", num_blocks=runner.num_blocks, vocab_size=runner.vocab_size,
                                         kv_infos=kv_infos if kv is not None else None))

        def parent_alive() -> None:
            if os.getppid() != args.parent_pid:
                raise SystemExit(f"rank {args.rank}: the engine core is gone")

        while True:
            sched_out = pickle.loads(broadcast.read(args.rank, on_idle=parent_alive))
            if sched_out is None:  # shutdown
                break
            if isinstance(sched_out, KVPoll):
                assert kv is not None, "a KV poll reached an engine without a connector"
                reports = _gather(runner, args, rank_report(kv, sched_out.meta))
                if results is not None:
                    results.write(*encode_result("kv", reports=reports), on_idle=parent_alive)
                continue
            logits = runner.execute_model(sched_out)
            if results is not None:
                results.write(*encode_result("logits", logits), on_idle=parent_alive)
    except BaseException as exc:  # report, then exit at once: the other ranks may be stuck in a collective
        logger.error("rank %d failed:\n%s", args.rank, traceback.format_exc())
        try:
            error_conn.send(f"{type(exc).__name__}: {exc}")
        except Exception:
            pass
        sys.stderr.flush()
        os._exit(1)
    if kv is not None:
        kv.shutdown()  # stop the KV server, finish the writes in flight
    for queue in (broadcast, results):
        if queue is not None:
            queue.close()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    os._exit(0)  # skip the interpreter's teardown of torch (seconds); nothing is left to flush


def _start_kv_connector(args: WorkerArgs, runner: StageRunner) -> Any:
    """This rank's worker half of the KV connector, on its own heads (None without a connector)."""
    if not args.config.kv_transfer.connector:
        return None
    kv = build_rank_connector(args.config, runner.kv_caches, args.rank % args.tp_size, args.tp_size,
                              engine_id=f"rank{args.rank}")
    runner.attach_kv_connector(kv)
    return kv


def _gather(runner: StageRunner, args: WorkerArgs, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on the output rank (None elsewhere), over the CPU group."""
    gathered: list[Any] | None = [None] * (args.tp_size * args.pp_size) if args.rank == args.output_rank else None
    torch.distributed.gather_object(obj, gathered, dst=args.output_rank, group=runner.cpu_group)
    return gathered


def _start(args: WorkerArgs) -> StageRunner:
    """Join the process group, then build this rank's runner."""
    config = args.config
    world = args.tp_size * args.pp_size
    device_name = config.device.device
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:  # one GPU per rank, in rank order
        device_name = f"cuda:{args.rank}"
        torch.cuda.set_device(args.rank)
        config = dataclasses.replace(config, device=dataclasses.replace(config.device, device=device_name))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{args.dist_port}",
                                         rank=args.rank, world_size=world, timeout=timedelta(minutes=10))
    # Block counts are agreed on the CPU: gloo beside NCCL on GPUs, the world group itself on CPU.
    cpu_group = torch.distributed.new_group(backend="gloo") if cuda else torch.distributed.group.WORLD
    pp_rank, tp_rank = divmod(args.rank, args.tp_size)
    tp_group = None
    for stage in range(args.pp_size):  # every rank creates every group, in the same order
        group = torch.distributed.new_group(list(range(stage * args.tp_size, (stage + 1) * args.tp_size)))
        if stage == pp_rank:
            tp_group = group
    shard = ModelShard(tp_rank=tp_rank, tp_size=args.tp_size, pp_rank=pp_rank, pp_size=args.pp_size,
                       tp_group=tp_group)
    return StageRunner(config, shard, args.rank, cpu_group)
