"""The same-node fast path of the grpc connector: decode copies blocks straight out of the prefill pod's GPU cache.

Within one node, moving a prompt's KV through host memory (stage on the host, serialize, stream, deserialize,
copy back) costs far more than the prefill that made it: a 4k-token Llama-3.1-8B prompt is 512 MiB of KV. CUDA
IPC lets another process map a GPU allocation: the prefill pod shares the handles of its per-layer cache tensors
once (``ShareCache``), and for each transfer the decode pod asks where the blocks sit (``LocateBlocks``), copies
them device to device (over NVLink when the pods use different GPUs of the node) and releases the transfer.

The handles are torch's own CUDA IPC sharing (what ``torch.multiprocessing`` uses), carried as plain protobuf
fields instead of pickles. IPC needs both processes on one host (same kernel: the node id is the boot id) and
the producer's GPU visible to the consumer (matched by UUID, since device indices differ between processes with
different ``CUDA_VISIBLE_DEVICES``); in Kubernetes, pods also need a shared IPC namespace (``hostIPC``). When any
of that does not hold, the connector falls back to streaming the blocks over gRPC.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


PROCESS_ID = uuid.uuid4().hex  # tells a process its own share apart (pids repeat across containers)


@functools.cache
def node_id() -> str:
    """This host's identity: its kernel boot id (shared by every container on the node), else a random id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return f"unknown-{uuid.uuid4().hex}"  # never equal to another process's: no IPC


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def local_device_index(uuid_str: str) -> int | None:
    """This process's index of the GPU with ``uuid_str``, or None when it cannot see that GPU."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid_str:
            return i
    return None


@dataclass(frozen=True)
class SharedCache:
    """What a producer shares: its node, GPU, cache identity and one IPC description per layer tensor."""

    node_id: str
    gpu_uuid: str
    cache_id: str
    layers: tuple[Any, ...]  # pdserve.v1.IpcTensor messages


def share_cache(kv_caches: Sequence[torch.Tensor], cache_id: str) -> SharedCache:
    """Describe the per-layer cache tensors for other processes (call once; the tensors live as long as the
    engine, so the handles stay valid)."""
    from pdserve.proto.pdserve.v1 import kv_transfer_pb2 as pb

    layers = []
    for t in kv_caches:
        if not t.is_cuda:
            raise ValueError("CUDA IPC needs a KV cache on a GPU")
        (_device, handle, storage_size, storage_offset, ref_handle, ref_offset, event_handle,
         event_sync) = t.untyped_storage()._share_cuda_()
        layers.append(pb.IpcTensor(
            handle=handle, storage_offset_bytes=storage_offset, storage_size_bytes=storage_size,
            ref_counter_handle=ref_handle, ref_counter_offset=ref_offset, event_handle=event_handle or b"",
            event_sync_required=bool(event_sync), shape=list(t.shape), stride=list(t.stride()),
            tensor_offset=t.storage_offset()))
    return SharedCache(node_id(), gpu_uuid(kv_caches[0].device), cache_id, tuple(layers))


def open_cache(share: Any, dtype: torch.dtype) -> list[torch.Tensor]:
    """Map a producer's shared cache (a ``CacheShare`` message) into this process as one tensor per layer.

    Raises ``RuntimeError`` when the memory cannot be mapped here (another node, an invisible GPU, no shared IPC
    namespace, or the same process: CUDA refuses to open a handle in the process that made it).
    """
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if share.node_id != node_id():
        raise RuntimeError("the KV server is on another node")
    if share.process_id == PROCESS_ID:
        raise RuntimeError("the KV server runs in this process")
    device = local_device_index(share.gpu_uuid)
    if device is None:
        raise RuntimeError(f"GPU {share.gpu_uuid} of the KV server is not visible to this process")
    tensors = []
    for layer in share.layers:
        t = rebuild_cuda_tensor(
            torch.Tensor, torch.Size(layer.shape), tuple(layer.stride), layer.tensor_offset, torch.UntypedStorage,
            dtype, device, layer.handle, layer.storage_size_bytes, layer.storage_offset_bytes, False,
            layer.ref_counter_handle, layer.ref_counter_offset, layer.event_handle,
            layer.event_sync_required)
        tensors.append(t)
    return tensors


def copy_blocks(src_caches: Sequence[torch.Tensor], src_ids: Sequence[int], dst_caches: Sequence[torch.Tensor],
                dst_ids: Sequence[int], stream: torch.cuda.Stream, after: torch.cuda.Event | None = None) -> None:
    """Copy blocks ``src_ids`` of every layer of a peer's cache into blocks ``dst_ids`` of ours, on ``stream``
    (after the event ``after``: work of ours that may still write those blocks), and wait for it. Whole blocks
    move (a partial block's unused slots carry stale bytes, which the request overwrites when it computes those
    positions). Bytes views: one path for every dtype, FP8 included."""
    dst_device = dst_caches[0].device
    with torch.cuda.stream(stream):
        if after is not None:
            stream.wait_event(after)
        src_idx = torch.tensor(list(src_ids), dtype=torch.long).to(src_caches[0].device)
        dst_idx = torch.tensor(list(dst_ids), dtype=torch.long).to(dst_device)
        for src, dst in zip(src_caches, dst_caches):
            picked = src.view(torch.uint8).index_select(1, src_idx)
            if picked.device != dst_device:
                picked = picked.to(dst_device, non_blocking=True)  # peer-to-peer between GPUs of the node
            dst.view(torch.uint8).index_copy_(1, dst_idx, picked)
    stream.synchronize()
