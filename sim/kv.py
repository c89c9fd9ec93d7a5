"""The simulated KV connector: the real scheduler's load path, with transfers that take modelled time and fail
as the fault spec says.

No bytes move. A prefill engine's finished request returns a handle (``engine_id``: its pod) with its token count;
a decode engine given that handle asks the scheduler to load those tokens (the scheduler allocates the blocks and
parks the request in ``WAITING_FOR_REMOTE_KV``, as with a real connector), and the worker half reports the load
finished once
``latency + bytes / bandwidth`` has passed on the engine's clock — or failed, with the reasons a real connector
reports (``checksum`` for a corrupted payload, ``peer_gone`` for a killed prefill pod, ``transfer_failed``), after
which the scheduler's failure policy applies (``recompute`` the prompt locally, or ``fail`` the request).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from pdserve.engine.kv_transfer.base import (
    KVConnectorMetadata,
    KVConnectorOutput,
    KVLoadError,
    KVTransferParams,
    LoadFailure,
)
from pdserve.engine.kv_transfer.block_format import KVDescriptor
from pdserve.sim.clock import Clock

logger = logging.getLogger(__name__)

SIM_CONNECTOR = "sim"


@dataclass(frozen=True)
class KVFaults:
    """Faults injected into KV loads. Defaults inject nothing beyond the modelled transfer time.

    ``latency_s`` is added to every load; ``bandwidth_gbps`` caps the transfer rate (GB/s; the default is CUDA IPC
    over NVLink as measured in docs/performance.md); ``fail_rate`` and ``corrupt_rate`` are per-load
    probabilities of a failed transfer and of a payload whose checksum does not match (both end as a load failure
    the scheduler handles); ``seed`` makes the draws reproducible.
    """

    latency_s: float = 0.0
    bandwidth_gbps: float = 63.4
    fail_rate: float = 0.0
    corrupt_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"KV fault latency must be >= 0 s, got {self.latency_s}")
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"KV bandwidth must be > 0 GB/s, got {self.bandwidth_gbps}")
        for name in ("fail_rate", "corrupt_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")

    def transfer_s(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / (self.bandwidth_gbps * 1e9)


@dataclass
class _Load:
    request_id: str
    ready_at: float
    failure: LoadFailure | None


@dataclass
class SimKVState:
    """What the two halves share in one engine: loads in flight, and the pods known dead (``peer_gone``)."""

    clock: Clock
    faults: KVFaults
    kv_bytes: Callable[[int], int]
    rng: random.Random = field(default_factory=random.Random)
    pending: dict[str, tuple[str, int]] = field(default_factory=dict)  # request id -> (source pod, tokens)
    loads: list[_Load] = field(default_factory=list)
    dead_sources: set[str] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=lambda: {"loads": 0, "loaded": 0, "failed": 0})

    def __post_init__(self) -> None:
        self.rng.seed(self.faults.seed)

    def next_ready_at(self) -> float | None:
        return min((ld.ready_at for ld in self.loads), default=None)


class SimKVScheduler:
    """The scheduler half (duck-typed on :class:`KVConnectorScheduler`; it needs no KV descriptor).

    ``role`` is ``prefill`` (finished requests return a handle), ``decode`` (requests with a handle load it) or
    ``both``. ``pod`` names this engine in the handles it writes.
    """

    def __init__(self, state: SimKVState, role: str, pod: str, descriptor: KVDescriptor,
                 load_failure_policy: str = "recompute") -> None:
        if load_failure_policy not in ("recompute", "fail"):
            raise ValueError(f"unknown kv load failure policy {load_failure_policy!r}; choose recompute or fail")
        self.state, self.role, self.pod, self.policy = state, role, pod, load_failure_policy
        self.descriptor = descriptor.to_dict()
        self.stats = None  # the engine's KV transfer metrics are those of real connectors

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        handle = request.kv_transfer_params
        if self.role == "prefill" or not handle or handle.get("connector") != SIM_CONNECTOR:
            return 0
        tokens = min(int(handle["num_tokens"]), request.num_tokens - 1)  # the last one is computed for logits
        return max(0, tokens - num_computed_tokens)

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        if num_external_tokens:
            self.state.pending[request.request_id] = (str(request.kv_transfer_params.get("engine_id", "")),
                                                      num_external_tokens)

    def build_connector_meta(self, sched_out: Any) -> KVConnectorMetadata:
        """Start the loads queued since the last step: draw their fate and finishing time now."""
        st, faults = self.state, self.state.faults
        now = st.clock.now()
        for rid, (source, tokens) in st.pending.items():
            failure = None
            draw = st.rng.random()
            if source in st.dead_sources:
                failure = LoadFailure("peer_gone", f"prefill pod {source} is gone")
            elif draw < faults.fail_rate:
                failure = LoadFailure("transfer_failed", "injected KV transfer failure")
            elif draw < faults.fail_rate + faults.corrupt_rate:
                failure = LoadFailure("checksum", "injected corrupted KV payload (checksum mismatch)")
            st.loads.append(_Load(rid, now + faults.transfer_s(st.kv_bytes(tokens)), failure))
            st.counters["loads"] += 1
        st.pending.clear()
        return KVConnectorMetadata()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.role == "decode" or request.status.finish_reason == "abort":
            return False, None
        # A real handle (the gRPC Prefill reply carries it as a KVTransferHandle); ``engine_id`` names the pod.
        return False, KVTransferParams(SIM_CONNECTOR, request.request_id, request.num_prompt_tokens,
                                       tuple(request.block_hashes), self.descriptor, engine_id=self.pod).to_dict()

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        pass

    def take_released(self) -> list[str]:
        return []

    def has_pending_work(self) -> bool:
        return bool(self.state.loads or self.state.pending)

    def request_aborted(self, request_id: str) -> None:
        self.state.pending.pop(request_id, None)

    def load_failed(self, request: Any, num_external_tokens: int, failure: LoadFailure) -> int:
        """Nothing of a failed simulated load landed: recompute it all, or fail the request."""
        if self.policy == "fail":
            raise KVLoadError(failure.reason, f"KV transfer failed ({failure.reason}): {failure.message}")
        return 0


class SimKVWorker:
    """The worker half: reports the loads whose time has come (duck-typed on :class:`KVConnectorWorker`)."""

    def __init__(self, state: SimKVState) -> None:
        self.state = state

    def bind_connector_metadata(self, meta: Any) -> None:
        pass

    def start_load_kv(self) -> None:
        pass

    def get_finished(self) -> KVConnectorOutput:
        st = self.state
        now = st.clock.now()
        out = KVConnectorOutput()
        keep = []
        for load in st.loads:
            if load.ready_at > now:
                keep.append(load)
            elif load.failure is None:
                out.finished_loading.add(load.request_id)
                st.counters["loaded"] += 1
            else:
                out.failed_loading[load.request_id] = load.failure
                st.counters["failed"] += 1
        st.loads = keep
        return out

    def has_pending_work(self) -> bool:
        return bool(self.state.loads)

    def shutdown(self) -> None:
        pass
