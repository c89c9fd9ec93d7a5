"""Drives a connector pair the way the scheduler and the model runner do, on real KV cache tensors (no model).

A producer "computes" a prompt in chunks (its cache is random data, as if written by the forward pass), saving
layer by layer; a consumer admits the decode request, loads, and the test compares the two caches block by block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
from pdserve.engine.kv_transfer.base import KVConnectorContext, KVConnectorOutput
from pdserve.engine.security import load_cluster_secret
from pdserve.engine.kv_transfer.block_format import KVDescriptor
from pdserve.engine.kv_transfer.registry import create_connector
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams


@dataclass
class Side:
    sched: Any
    worker: Any
    caches: list[torch.Tensor]
    output: KVConnectorOutput
    released: list[str]

    def close(self) -> None:
        self.worker.shutdown()


def make_side(connector: str, role: str, desc: KVDescriptor, options: dict[str, Any], num_blocks: int = 32,
              fill: str = "random") -> Side:
    ctx = KVConnectorContext(role=role, descriptor=desc, engine_id=f"{role}-engine", options=options,
                             cluster_secret=load_cluster_secret())
    sched, worker = create_connector(connector, ctx)
    shape = (2, num_blocks, desc.block_size, desc.num_kv_heads, desc.head_dim)
    dtype = getattr(torch, desc.dtype)
    gen = torch.Generator().manual_seed(hash(role) & 0xFFFF)
    caches = [torch.randn(shape, generator=gen).to(dtype) if fill == "random" else torch.zeros(shape, dtype=dtype)
              for _ in range(desc.num_layers)]
    worker.register_kv_caches(caches)
    return Side(sched, worker, caches, KVConnectorOutput(), [])


def make_request(rid: str, prompt: list[int], output: list[int] = (), params: dict | None = None) -> Request:
    req = Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params=SamplingParams(max_tokens=8))
    req.output_token_ids = list(output)
    req.kv_transfer_params = params
    return req


def step(side: Side, chunks: list[ScheduledChunk]) -> None:
    """One engine step: metadata to the worker, loads started, every layer saved, saves handed off."""
    meta = side.sched.build_connector_meta(SchedulerOutput(chunks=chunks))
    side.worker.bind_connector_metadata(meta)
    side.worker.start_load_kv()
    for i, layer in enumerate(side.caches):
        side.worker.wait_for_layer_load(i)
        side.worker.save_kv_layer(i, layer)
    side.worker.wait_for_save()
    pump(side)


def pump(side: Side) -> None:
    out = side.worker.get_finished()
    side.sched.update_connector_output(out)
    side.output.finished_loading |= out.finished_loading
    side.output.failed_loading.update(out.failed_loading)
    for rid, n in out.finished_saving.items():
        side.output.finished_saving[rid] = side.output.finished_saving.get(rid, 0) + n
    side.output.released |= out.released
    side.released += side.sched.take_released()


def wait_for(side: Side, cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("connector did not finish in time")
        time.sleep(0.005)
        pump(side)


def prefill(side: Side, req: Request, block_ids: list[int], chunk: int | None = None) -> tuple[bool, dict | None]:
    """Admit and compute a prompt in chunks of ``chunk`` tokens, then finish the request (one token sampled)."""
    req.status = RequestStatus.RUNNING
    side.sched.update_state_after_alloc(req, block_ids, 0)
    n, pos, chunk = req.num_prompt_tokens, 0, chunk or req.num_prompt_tokens
    while pos < n:
        size = min(chunk, n - pos)
        step(side, [ScheduledChunk(req.request_id, req.prompt_token_ids[pos:pos + size], pos, block_ids,
                                   pos + size == n)])
        pos += size
    req.status = RequestStatus.FINISHED_LENGTH
    result = side.sched.request_finished(req, block_ids)
    step(side, [])  # the engine steps on while it holds blocks: the next step's metadata reaches the worker
    return result


def admit(side: Side, req: Request, block_ids: list[int], num_local: int = 0) -> int | None:
    """The scheduler's admission of a consumer request; returns the external token count (None: ask later)."""
    n = side.sched.get_num_new_matched_tokens(req, num_local)
    if n is None:
        return None
    req.num_computed_tokens = num_local
    side.sched.update_state_after_alloc(req, block_ids, n)
    step(side, [])
    return n


def same_kv(a: Side, a_blocks: list[int], b: Side, b_blocks: list[int], num_tokens: int, block_size: int) -> bool:
    """The first ``num_tokens`` token slots of two block tables hold equal KV in every layer."""
    for pos in range(0, num_tokens, block_size):
        n = min(block_size, num_tokens - pos)
        i = pos // block_size
        for la, lb in zip(a.caches, b.caches):
            if not torch.equal(la[:, a_blocks[i], :n], lb[:, b_blocks[i], :n]):
                return False
    return True
