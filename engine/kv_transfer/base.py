"""The KV connector interface: a scheduler half and a worker half, and the plain data that flows between them.

A connector moves KV blocks between engines (prefill pods save, decode pods load). It is split the way the engine
is split::

    scheduler half (no torch)                       worker half (owns no state the scheduler needs)
    ─────────────────────────                       ───────────────────────────────────────────────
    get_num_new_matched_tokens(request)  ─┐         register_kv_caches(kv_caches)
    update_state_after_alloc(request)     │ meta    bind_connector_metadata(meta)
    build_connector_meta(sched_out) ──────┴───────▶ start_load_kv()            before the forward pass
    request_finished(request) -> hold?              wait_for_layer_load(i)     before layer i
    update_connector_output(out) ◀───────┐          save_kv_layer(i, kv)       after layer i wrote its KV
    take_released() -> free these blocks │ output   wait_for_save()            after the forward pass
                                         └───────── get_finished()             every step

Loads are asynchronous: the scheduler allocates blocks for the external tokens, the request waits while the worker
fills them (other requests keep running), and ``get_finished`` reports it loaded (or failed, then the
``load_failure_policy`` decides: ``recompute`` the missing tokens locally, or ``fail`` the request). A producer may
ask to keep a finished request's blocks (``request_finished`` returns ``hold=True``) until its saves are written
or its peer acknowledges a pull, under a lease; ``take_released`` hands them back to the scheduler.

With asynchronous scheduling the scheduler half works one step behind, as sampling does: ``build_connector_meta``
of step N+1 comes before the update of step N, which is when requests finish (``request_finished``) and the
worker's results are applied (``update_connector_output``), after the host waited for step N. So a prefill's
handle and blocks are handed over only once the step that computed them is done; saves are counted when their
step is scheduled, so a request aborted while that step runs stays held until they are written; loads are
ordered after the steps already launched (see :meth:`KVConnectorWorker.start_load_kv`). The built-in connectors
never look a request up again once its load ended (preempted, it recomputes: the transfer is spent).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import queue
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pdserve.engine.core.block_hash import HASH_BYTES, hash_to_bytes
from pdserve.engine.kv_transfer.block_format import KVDescriptor
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.security import ClusterSecret

if TYPE_CHECKING:
    from pdserve.engine.core.sched_output import SchedulerOutput
    from pdserve.engine.request import Request

logger = logging.getLogger(__name__)


class KVRole(str, enum.Enum):
    """What an engine does with KV: ``both`` (monolithic), ``prefill`` (producer), ``decode`` (consumer)."""

    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


class LoadFailurePolicy(str, enum.Enum):
    """What a consumer does when KV cannot be loaded: compute it locally, or fail the request."""

    RECOMPUTE = "recompute"
    FAIL = "fail"


# Load failures that are a cache miss whatever the policy (a planted block: recomputing is always right).
MISS_REASONS = frozenset({"mac"})
ROLES = tuple(r.value for r in KVRole)
LOAD_FAILURE_POLICIES = tuple(p.value for p in LoadFailurePolicy)


class KVLoadError(RuntimeError):
    """A request's KV could not be loaded and the policy is ``fail``: the request ends with this message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class KVConnectorContext:
    """Plain values a connector is built from (taken from the engine config and the allocated KV cache)."""

    role: KVRole  # a plain string is accepted and converted
    descriptor: KVDescriptor
    engine_id: str
    options: Mapping[str, Any] = field(default_factory=dict)
    # The block-hash seed (the descriptor carries only its public id): secret when derived from the cluster secret.
    hash_seed: int = field(default=0, compare=False, repr=False)
    # The deployment's secret (signs handles, call tokens and stored blocks); None only in tests of the halves.
    cluster_secret: ClusterSecret | None = field(default=None, compare=False, repr=False)
    redis_password: str | None = field(default=None, compare=False, repr=False)
    # The model's KV heads (all ranks together); 0: the descriptor's (a single-rank cache holds them all).
    total_kv_heads: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "role", KVRole(self.role))
        except ValueError:
            raise ValueError(f"unknown KV transfer role {self.role!r}; choose one of {', '.join(ROLES)}") from None
        policy = self.options.get("load_failure_policy", LoadFailurePolicy.RECOMPUTE.value)
        if policy not in LOAD_FAILURE_POLICIES:
            raise ValueError(f"unknown kv load failure policy {policy!r}; choose "
                             f"{' or '.join(LOAD_FAILURE_POLICIES)}")

    @property
    def is_producer(self) -> bool:
        """Saves the KV it computes (prefill pods; a monolithic engine with a shared store)."""
        return self.role in (KVRole.BOTH, KVRole.PREFILL)

    @property
    def is_consumer(self) -> bool:
        """Loads KV computed elsewhere (decode pods; a monolithic engine with a shared store)."""
        return self.role in (KVRole.BOTH, KVRole.DECODE)

    @property
    def kv_heads(self) -> int:
        """The model's KV heads, whatever share of them this engine's ranks hold (see :mod:`.head_shards`)."""
        return self.total_kv_heads or self.descriptor.num_kv_heads * self.descriptor.tp_size

    @property
    def load_failure_policy(self) -> LoadFailurePolicy:
        return LoadFailurePolicy(self.options.get("load_failure_policy", LoadFailurePolicy.RECOMPUTE.value))

    def option(self, key: str, default: Any = None) -> Any:
        value = self.options.get(key)
        return default if value is None else value


class KVHandleError(ValueError):
    """A transfer handle that is malformed, unsigned, forged or expired. The message never echoes secrets."""


_HANDLE_FIELDS = ("connector", "transfer_id", "num_tokens", "block_hashes", "descriptor")


@dataclass(frozen=True)
class KVTransferParams:
    """The transfer handle: what a prefill returns and a decode request carries (as a dict on the wire).

    ``block_hashes`` are the chained hashes of the prompt's full blocks, then, when ``num_tokens`` is not a
    multiple of the block size, the hash of the last, partial block. ``kv_server`` is the prefill pod's KV server
    (grpc connector); ``transfer_id`` is a random 128-bit token that names the prefill's blocks there (never the
    request id, so it cannot be guessed). ``mac`` is ``ClusterSecret.sign("kv-handle", ...)`` over
    :meth:`canonical` (every other field, ``expires_at`` included): a decode pod dials only the KV server of a
    handle that verifies, so only a pod holding the cluster secret can send it anywhere.
    """

    connector: str
    transfer_id: str
    num_tokens: int
    block_hashes: tuple[int, ...]
    descriptor: dict[str, Any]
    engine_id: str = ""
    kv_server: str | None = None
    expires_at: float = 0.0  # unix time after which the handle is refused
    mac: str = ""  # hex HMAC-SHA256 over canonical()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_hashes"] = [f"{h:032x}" for h in self.block_hashes]  # 128 bits: JSON numbers cannot hold them
        return d

    def canonical(self) -> bytes:
        """The bytes the MAC covers: every field but ``mac``, as sorted, compact JSON."""
        d = self.to_dict()
        del d["mac"]
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, secret: ClusterSecret, ttl_s: float) -> "KVTransferParams":
        """This handle, valid for ``ttl_s`` seconds from now, with its MAC."""
        unsigned = dataclasses.replace(self, expires_at=round(time.time() + ttl_s, 3), mac="")
        return dataclasses.replace(unsigned, mac=secret.sign("kv-handle", unsigned.canonical()).hex())

    def verify(self, secret: ClusterSecret, now: float | None = None) -> None:
        """Raise :class:`KVHandleError` unless the handle was signed under ``secret`` and has not expired."""
        if not self.mac:
            raise KVHandleError("the transfer handle is not signed")
        try:
            mac = bytes.fromhex(self.mac)
        except ValueError:
            raise KVHandleError("the transfer handle's signature is malformed") from None
        if not secret.verify("kv-handle", self.canonical(), mac):
            raise KVHandleError("the transfer handle's signature does not verify (forged, altered, or signed "
                                "under another cluster secret)")
        if (time.time() if now is None else now) > self.expires_at:
            raise KVHandleError("the transfer handle expired")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KVTransferParams":
        """Parse a handle; :class:`KVHandleError` (a ``ValueError``) naming the field for a malformed one."""
        if not isinstance(data, Mapping):
            raise KVHandleError("kv_transfer_params must be an object")
        for name in _HANDLE_FIELDS:
            if name not in data:
                raise KVHandleError(f"kv_transfer_params lacks {name!r}")
        field_name = "block_hashes"
        try:
            if isinstance(data["block_hashes"], (str, bytes)) or not isinstance(data["block_hashes"], Sequence):
                raise TypeError
            hashes = tuple(int(h, 16) if isinstance(h, str) else _plain_int(h) for h in data["block_hashes"])
            if any(not 0 <= h < 1 << (8 * HASH_BYTES) for h in hashes):
                raise ValueError
            field_name = "num_tokens"
            num_tokens = _plain_int(data["num_tokens"])
            field_name = "descriptor"
            if not isinstance(data["descriptor"], Mapping):
                raise TypeError
            field_name = "expires_at"
            expires_at = float(data.get("expires_at") or 0.0)
            field_name = "mac"
            mac = data.get("mac") or ""
            if not isinstance(mac, str):
                raise TypeError
        except (TypeError, ValueError, OverflowError):
            raise KVHandleError(f"kv_transfer_params.{field_name} is malformed") from None
        if num_tokens <= 0:
            raise KVHandleError("kv_transfer_params.num_tokens must be positive")
        kv_server = data.get("kv_server") or None
        if kv_server is not None and not isinstance(kv_server, str):
            raise KVHandleError("kv_transfer_params.kv_server must be a string")
        return cls(connector=str(data["connector"]), transfer_id=str(data["transfer_id"]), num_tokens=num_tokens,
                   block_hashes=hashes, descriptor=dict(data["descriptor"]),
                   engine_id=str(data.get("engine_id") or ""), kv_server=kv_server, expires_at=expires_at, mac=mac)

    def to_proto(self) -> Any:
        """As a ``pdserve.v1.KVTransferHandle`` message (disagg.proto)."""
        from pdserve.engine.kv_transfer.block_format import KVDescriptor
        from pdserve.proto.pdserve.v1 import disagg_pb2

        return disagg_pb2.KVTransferHandle(
            connector=self.connector, transfer_id=self.transfer_id, num_tokens=self.num_tokens,
            block_hashes=[hash_to_bytes(h) for h in self.block_hashes],
            descriptor=KVDescriptor.from_dict(self.descriptor).to_proto(),
            engine_id=self.engine_id, kv_server=self.kv_server or "", expires_at=self.expires_at, mac=self.mac)

    @classmethod
    def from_proto(cls, msg: Any) -> "KVTransferParams":
        from pdserve.engine.kv_transfer.block_format import KVDescriptor

        desc = {f.name: getattr(msg.descriptor, f.name) for f in dataclasses.fields(KVDescriptor)}
        return cls.from_dict({"connector": msg.connector, "transfer_id": msg.transfer_id,
                              "num_tokens": msg.num_tokens,
                              "block_hashes": [h.hex() for h in msg.block_hashes],  # 16 bytes big-endian
                              "descriptor": desc, "engine_id": msg.engine_id, "kv_server": msg.kv_server or None,
                              "expires_at": msg.expires_at, "mac": msg.mac})


def _plain_int(value: Any) -> int:
    """An int from JSON (bools and floats are refused: ``True`` or ``1.5`` is no token count or hash)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


@dataclass(frozen=True)
class BlockRef:
    """One block of a transfer: where it lives in this engine's cache and what it holds."""

    block_id: int  # in this engine's KV cache
    block_hash: int  # chained hash (store key; partial blocks hash their tokens so far)
    num_tokens: int  # block_size, or fewer for a prompt's last partial block
    index: int  # position of the block in its request's block table


@dataclass(frozen=True)
class LoadSpec:
    """Fill ``blocks`` of a request with KV from outside; ``source`` is connector-specific (e.g. a KV server)."""

    request_id: str
    blocks: tuple[BlockRef, ...]
    source: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.blocks)


@dataclass(frozen=True)
class SaveSpec:
    """Blocks of a request whose KV this step completes (or that a store lacks): save them."""

    request_id: str
    blocks: tuple[BlockRef, ...]


@dataclass(frozen=True)
class ServeSpec:
    """A finished prefill's blocks that the worker serves to peers under ``transfer_id`` for ``lease_s`` (grpc)."""

    transfer_id: str
    blocks: tuple[BlockRef, ...]
    lease_s: float


@dataclass
class KVConnectorMetadata:
    """What the scheduler half tells the worker half for one step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # Transfers the worker should stop serving (lease over, request aborted): connector-specific ids.
    revoked: list[str] = field(default_factory=list)
    # (KV server, transfer id) of verified handles that will never be loaded (the request finished or was aborted
    # first): the worker tells the prefill pod to free the blocks now instead of at the lease's end.
    releases: list[tuple[str, str]] = field(default_factory=list)
    # Producer: transfers to start serving (their blocks stay allocated until released or expired).
    serve: list[ServeSpec] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.loads or self.saves or self.revoked or self.releases or self.serve)


@dataclass(frozen=True)
class LoadFailure:
    """A load that did not (fully) happen. The first ``num_valid_blocks`` blocks of the spec did load."""

    reason: str  # metrics label: missing | checksum | incompatible | store_unavailable | timeout | peer_gone ...
    message: str
    num_valid_blocks: int = 0


@dataclass
class KVConnectorOutput:
    """What the worker half finished since the last call (see :meth:`KVConnectorWorker.get_finished`)."""

    finished_loading: set[str] = field(default_factory=set)
    # request id -> payload bytes its finished load moved (for the per-request timeline)
    loaded_bytes: dict[str, int] = field(default_factory=dict)
    failed_loading: dict[str, LoadFailure] = field(default_factory=dict)
    # request id -> number of its SaveSpecs now fully written
    finished_saving: dict[str, int] = field(default_factory=dict)
    # transfer ids the peer acknowledged (grpc: pulled and released)
    released: set[str] = field(default_factory=set)
    # transfer ids whose lease ran out before a peer released them
    expired: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not (self.finished_loading or self.failed_loading or self.finished_saving or self.released
                    or self.expired)

    def apply_all(self, results: queue.SimpleQueue[Callable[[KVConnectorOutput], None]]) -> KVConnectorOutput:
        """Apply every result a worker's threads queued (each a small edit of an output) and return ``self``.

        Worker threads never touch the output the engine reads: they queue edits, and the engine's thread applies
        them here, in ``get_finished``."""
        while True:
            try:
                results.get_nowait()(self)
            except queue.Empty:
                return self


class KVConnectorScheduler(ABC):
    """The scheduler half. Torch-free; called from the scheduler's thread only."""

    def __init__(self, ctx: KVConnectorContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        """Prompt tokens beyond ``num_computed_tokens`` (local prefix hits) that can be loaded from outside.

        ``None`` means "ask again later" (e.g. the blocks are still being written): the request stays waiting.
        Raises :class:`KVLoadError` when the load cannot happen and the policy is ``fail``. Never more than
        ``request.num_tokens - 1`` tokens in all: the last one is computed so that the step has logits.
        """

    @abstractmethod
    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """Blocks are allocated for a newly admitted request (``num_external_tokens`` of them to be loaded)."""

    @abstractmethod
    def build_connector_meta(self, sched_out: SchedulerOutput) -> KVConnectorMetadata:
        """The worker's instructions for the step just scheduled (consumes what was queued since last time)."""

    @abstractmethod
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """A request ends. Returns ``(hold, kv_transfer_params)``: when ``hold``, the scheduler keeps its blocks
        until :meth:`take_released` names it."""

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        """Digest what the worker finished (saves written, pulls acknowledged)."""

    def take_released(self) -> list[str]:
        """Held requests whose blocks can be freed now (saves done, peer acknowledged, or lease expired)."""
        return []

    def has_pending_work(self) -> bool:
        """True while held blocks or in-flight transfers need the engine to keep stepping."""
        return False

    def request_aborted(self, request_id: str) -> None:
        """A waiting request left before it was admitted; drop any state kept for it."""

    def load_failed(self, request: Request, num_external_tokens: int, failure: "LoadFailure") -> int:
        """A load failed: how many of its tokens did land (the scheduler computes the rest), or raise
        :class:`KVLoadError` under the ``fail`` policy. A block that failed its MAC is a miss under either policy
        (whoever can write the store must not be able to fail other tenants' requests), and so is any failure of
        a request without a handle (its lookup was optional: nothing was promised)."""
        if self.ctx.load_failure_policy is LoadFailurePolicy.FAIL and failure.reason not in MISS_REASONS \
                and request.kv_transfer_params:
            raise KVLoadError(failure.reason, f"KV transfer failed ({failure.reason}): {failure.message}")
        logger.warning("request %s: %s; computing the missing KV locally", request.request_id, failure.message)
        return min(num_external_tokens, failure.num_valid_blocks * self.ctx.descriptor.block_size)

    @property
    def stats(self) -> KVTransferStats | None:
        """Cumulative counters for metrics (shared with the worker half when both live in one process)."""
        return None


class KVConnectorWorker(ABC):
    """The worker half: moves bytes between the KV cache tensors and the outside."""

    # Whether a step may run as a CUDA graph replay, which calls no per-layer hook: the worker's
    # :meth:`wait_for_save` then saves every layer :meth:`save_kv_layer` was not told about. Steps that start a
    # load always run eagerly. A worker that relies on the per-layer calls keeps this False, and steps with
    # prompt chunks then run eagerly (``engine/worker/mixed_graphs.py``).
    saves_unreported_layers: bool = False

    def __init__(self, ctx: KVConnectorContext) -> None:
        self.ctx = ctx
        self.kv_caches: list[Any] = []
        self._meta = KVConnectorMetadata()

    def register_kv_caches(self, kv_caches: list[Any]) -> None:
        """The per-layer caches ``[2, num_blocks, block_size, Hkv, D]`` (called once, before any step)."""
        self.kv_caches = list(kv_caches)

    def bind_connector_metadata(self, meta: KVConnectorMetadata | None) -> None:
        self._meta = meta if meta is not None else KVConnectorMetadata()

    def start_load_kv(self) -> None:
        """Begin the loads of this step's metadata (asynchronously). Called from the engine's thread; with
        asynchronous scheduling a step launched earlier may still be running and writing into blocks that were
        freed since and now belong to a load, so a worker orders its writes into the cache after the device work
        queued so far (``kv_layout.device_fence``)."""

    def wait_for_layer_load(self, layer_idx: int) -> None:
        """Block until layer ``layer_idx`` of any load this forward pass depends on is in place."""

    def save_kv_layer(self, layer_idx: int, kv_layer: Any) -> None:
        """Layer ``layer_idx`` has written this step's KV into ``kv_layer``: start saving it."""

    def wait_for_save(self) -> None:
        """After the forward pass: every layer's save was started (writes may complete later)."""

    @abstractmethod
    def get_finished(self) -> KVConnectorOutput:
        """Loads, saves and acknowledgements completed since the last call."""

    def has_pending_work(self) -> bool:
        return False

    def shutdown(self) -> None:
        """Stop threads and servers; pending work is abandoned."""
