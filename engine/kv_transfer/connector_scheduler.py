"""The scheduler half shared by the connectors: lookups, load specs, save specs, holds and the failure policy.

Subclasses say how to find blocks (:meth:`_lookup`) and whether they save blocks layer by layer
(``saves_blocks``: the stores) or keep them in the cache for a peer to pull (the grpc connector). Torch-free.

A request's prompt blocks, seen from a consumer (block size 4, prompt of 10 tokens, then the prefill's token)::

    prompt:  |t0 t1 t2 t3|t4 t5 t6 t7|t8 t9|      + first token from the prefill (an output token here)
    blocks:  |  hit (1)  | external  |ext. | (partial block: travels too)
             |<-local->|<-- num_external_tokens -->|<- computed: the last known token gives logits
"""

from __future__ import annotations

import logging
import secrets
import time
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pdserve.engine.core.block_hash import BlockHasher
from pdserve.engine.kv_transfer.base import (BlockRef, KVConnectorContext, KVConnectorMetadata,
                                             KVConnectorOutput, KVConnectorScheduler, KVHandleError, KVLoadError,
                                             KVRole, KVTransferParams, LoadFailurePolicy, LoadSpec, SaveSpec)
from pdserve.engine.kv_transfer.block_format import KVDescriptor, KVFormatError
from pdserve.engine.kv_transfer.head_shards import check_shard_compatible
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.kv_transfer.prompt_blocks import PromptBlock, extra_keys_of, prompt_blocks, tokens_covered
from pdserve.engine.kv_transfer.stores.store import StoreUnavailableError

if TYPE_CHECKING:
    from pdserve.engine.core.sched_output import ScheduledChunk, SchedulerOutput
    from pdserve.engine.request import Request

logger = logging.getLogger(__name__)


@dataclass
class _Producing:
    """Save progress of one request on a producer: blocks below ``next_block`` are saved or scheduled to be."""

    blocks: list[PromptBlock]
    num_prompt_tokens: int
    next_block: int
    backfill: list[int] = field(default_factory=list)  # cached blocks the store lacks: save with the next chunk


class BlockConnectorScheduler(KVConnectorScheduler):
    """Common bookkeeping; see the module docstring."""

    saves_blocks = True  # False: the connector serves blocks from the cache (no save specs)
    loads_without_handle = True  # True: look a request's prompt up even when it carries no transfer handle

    def __init__(self, ctx: KVConnectorContext, name: str, stats: KVTransferStats) -> None:
        super().__init__(ctx)
        desc = ctx.descriptor
        self.name = name
        self.block_size = desc.block_size
        self.hasher = BlockHasher(desc.block_size, ctx.hash_seed, desc.hash_algo)
        self._stats = stats
        self.wait_timeout_s = float(ctx.option("kv_load_timeout_s", 10.0))
        self._first_seen: dict[str, float] = {}  # requests waiting for blocks still being written
        self._found: dict[str, tuple[list[PromptBlock], dict[str, Any]]] = {}  # looked up, not yet allocated
        self._pending_loads: list[LoadSpec] = []
        self._loading: set[str] = set()
        # Requests whose load ended (loaded or failed). If preempted, they recompute from their own prefix cache:
        # the transfer is spent (a grpc peer freed it on release), and asking again could only fail.
        self._consumed: set[str] = set()
        self._producing: dict[str, _Producing] = {}
        self._pending_saves: Counter[str] = Counter()
        self._held: dict[str, int] = {}  # request id -> blocks held
        self._released: list[str] = []

    @property
    def stats(self) -> KVTransferStats:
        return self._stats

    # ------------------------------------------------------------------ consumer
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        rid = request.request_id
        if not self.ctx.is_consumer or rid in self._consumed:
            return 0
        try:
            handle = handle_of(request)
            if handle is not None and self.ctx.cluster_secret is not None:
                handle.verify(self.ctx.cluster_secret)  # before anything in it is trusted (or dialled)
        except KVHandleError as exc:
            return self._miss_or_fail(rid, "bad_handle", str(exc))
        if handle is None and not self.loads_without_handle:
            return 0
        n_saved = min(handle.num_tokens if handle else request.num_prompt_tokens, request.num_prompt_tokens)
        blocks = prompt_blocks(self.hasher, request.prompt_token_ids[:n_saved], extra_keys_of(request))
        if handle is not None:
            problem = self._check_handle(handle, blocks)
            if problem:
                return self._miss_or_fail(rid, "incompatible", problem)
        bs, limit = self.block_size, request.num_tokens - 1  # the last known token is always computed
        wanted = [b for b in blocks[num_computed_tokens // bs:] if b.index * bs < limit]
        if not wanted:
            self._first_seen.pop(rid, None)
            return 0
        try:
            found, source = self._lookup(request, handle, wanted)
        except (StoreUnavailableError, KVFormatError) as exc:
            if handle is None:  # an optional lookup (no prefill promised anything): a miss under any policy
                self._stats.record_failure(exc.reason)
                self._first_seen.pop(rid, None)
                return 0
            return self._miss_or_fail(rid, exc.reason, str(exc))
        if found < len(wanted) and handle is not None:
            # The prefill answered before its writes landed: wait for them, up to the load timeout.
            first = self._first_seen.setdefault(rid, time.monotonic())
            if time.monotonic() - first < self.wait_timeout_s:
                return None
            self._miss_or_fail(rid, "missing", f"{len(wanted) - found} of {len(wanted)} KV blocks of request "
                                                f"{rid} never appeared in the {self.name} store")
        self._first_seen.pop(rid, None)
        if found == 0:
            return 0
        got = wanted[:found]
        self._found[rid] = (got, {**source, "sender_tp": self.sender_tp(handle)})
        return min(num_computed_tokens + tokens_covered(got), limit) - num_computed_tokens

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """Queue the load of the external tokens; start tracking a producer's saves.

        ``request.num_computed_tokens`` must already count the local prefix-cache hits (not the external tokens).
        """
        rid = request.request_id
        found = self._found.pop(rid, None)
        num_local = request.num_computed_tokens
        loaded_until = num_local
        if num_external_tokens > 0 and found:
            blocks, source = found
            end = num_local + num_external_tokens
            refs = tuple(BlockRef(block_ids[b.index], b.block_hash, b.num_tokens, b.index)
                         for b in blocks if b.index * self.block_size < end)
            self._pending_loads.append(LoadSpec(rid, refs, source))
            self._loading.add(rid)
            loaded_until = end
        if self.ctx.is_producer and self.saves_blocks:
            self._start_producing(request, num_local, loaded_until)

    def build_connector_meta(self, sched_out: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if self.ctx.is_producer and self.saves_blocks:
            for chunk in sched_out.chunks:
                spec = self._save_spec(chunk)
                if spec is not None:
                    meta.saves.append(spec)
                    self._pending_saves[chunk.request_id] += 1
        return meta

    # ------------------------------------------------------------------ finish, holds
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._first_seen.pop(rid, None)
        self._found.pop(rid, None)
        self._consumed.discard(rid)
        producing = self._producing.pop(rid, None)
        params = None
        if self.ctx.role is KVRole.PREFILL and getattr(request, "abort_reason", None) is None \
                and request.status.value != "abort":
            params = self._make_handle(request, producing, block_ids).to_dict()
        hold = self._pending_saves.get(rid, 0) > 0 or rid in self._loading
        if hold:
            self._held[rid] = len(block_ids)
            self._stats.set_blocks_held(sum(self._held.values()))
        return hold, params

    def request_aborted(self, request_id: str) -> None:
        self._first_seen.pop(request_id, None)
        self._found.pop(request_id, None)

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        for rid, n in output.finished_saving.items():
            self._pending_saves[rid] -= n
            if self._pending_saves[rid] <= 0:
                del self._pending_saves[rid]
                self._maybe_release(rid)
        for rid in output.finished_loading | set(output.failed_loading):
            if rid in self._loading and rid not in self._held:  # (a held one finished while loading)
                self._consumed.add(rid)
            self._loading.discard(rid)
            self._maybe_release(rid)

    def take_released(self) -> list[str]:
        out, self._released = self._released, []
        return out

    def has_pending_work(self) -> bool:
        return bool(self._held or self._loading or self._pending_saves or self._first_seen)

    # ------------------------------------------------------------------ hooks for subclasses
    @abstractmethod
    def _lookup(self, request: Request, handle: KVTransferParams | None, wanted: list[PromptBlock]
                ) -> tuple[int, dict[str, Any]]:
        """How many leading blocks of ``wanted`` can be loaded, and the load's source description."""

    def _kv_server_address(self) -> str | None:
        return None

    def sender_tp(self, handle: KVTransferParams | None) -> int:
        """The tensor-parallel size of the engine whose KV a load reads: the handle's producer, else this
        engine's own layout (a store lookup without a handle finds what engines like this one saved)."""
        if handle is None:
            return self.ctx.descriptor.tp_size
        return int(handle.descriptor.get("tp_size", 1))

    def _is_held_elsewhere(self, request_id: str) -> bool:
        """Whether something besides saves and loads keeps the request's blocks (the grpc connector's lease)."""
        return False

    # ------------------------------------------------------------------ internals
    def _miss_or_fail(self, request_id: str, reason: str, message: str) -> int:
        """A load that cannot happen: count it, then fail the request or let it compute (a miss)."""
        self._stats.record_failure(reason)
        self._first_seen.pop(request_id, None)
        if self.ctx.load_failure_policy is LoadFailurePolicy.FAIL:
            raise KVLoadError(reason, f"KV transfer failed ({reason}): {message}")
        logger.warning("request %s: %s; computing its KV locally", request_id, message)
        return 0

    def _check_handle(self, handle: KVTransferParams, blocks: list[PromptBlock]) -> str | None:
        if handle.connector != self.name:
            return f"the KV was saved through the {handle.connector!r} connector, this engine uses {self.name!r}"
        try:
            theirs = KVDescriptor.from_dict(handle.descriptor)
        except KVFormatError as exc:
            return str(exc)
        try:  # another tensor-parallel layout is fine: the loading ranks pick their heads from its shards
            check_shard_compatible(self.ctx.descriptor, theirs, self.ctx.kv_heads)
        except KVFormatError as exc:
            return str(exc)
        if tuple(b.block_hash for b in blocks) != handle.block_hashes[:len(blocks)]:
            return "the prompt's block hashes differ from the prefill's (other tokens or hash settings)"
        return None

    def _start_producing(self, request: Request, num_local: int, loaded_until: int) -> None:
        n = request.num_prompt_tokens
        blocks = prompt_blocks(self.hasher, request.prompt_token_ids, extra_keys_of(request))
        bs = self.block_size
        # Blocks loaded from the store are there already; local hits may have been evicted from it.
        next_block = len(blocks) if loaded_until >= n else loaded_until // bs
        state = _Producing(blocks, n, max(next_block, num_local // bs))
        hits = blocks[:min(num_local // bs, len(blocks))]
        if hits and loaded_until == num_local:
            try:
                present = self._contains([b.block_hash for b in hits])
            except StoreUnavailableError as exc:
                self._stats.record_failure(exc.reason)
                present = [True] * len(hits)  # nothing to gain from writing to a store that is down
            state.backfill = [b.index for b, ok in zip(hits, present) if not ok]
        self._producing[request.request_id] = state

    def _contains(self, hashes: list[int]) -> list[bool]:
        return [True] * len(hashes)

    def _save_spec(self, chunk: ScheduledChunk) -> SaveSpec | None:
        state = self._producing.get(chunk.request_id)
        if state is None:
            return None
        done = min(chunk.start_pos + chunk.num_tokens, state.num_prompt_tokens)
        n_done = done // self.block_size
        if done == state.num_prompt_tokens and done % self.block_size:
            n_done += 1  # the partial last block is complete once the whole prompt is computed
        indices = state.backfill + list(range(state.next_block, n_done))
        state.backfill = []
        state.next_block = max(state.next_block, n_done)
        if not indices:
            return None
        blocks = state.blocks
        refs = tuple(BlockRef(chunk.block_ids[i], blocks[i].block_hash, blocks[i].num_tokens, i) for i in indices)
        return SaveSpec(chunk.request_id, refs)

    def _make_handle(self, request: Request, producing: _Producing | None, block_ids: list[int]) -> KVTransferParams:
        blocks = producing.blocks if producing is not None else \
            prompt_blocks(self.hasher, request.prompt_token_ids, extra_keys_of(request))
        handle = KVTransferParams(connector=self.name, transfer_id=secrets.token_hex(16),
                                  num_tokens=request.num_prompt_tokens,
                                  block_hashes=tuple(b.block_hash for b in blocks),
                                  descriptor=self.ctx.descriptor.to_dict(), engine_id=self.ctx.engine_id,
                                  kv_server=self._kv_server_address())
        secret = self.ctx.cluster_secret
        return handle.signed(secret, self.handle_ttl_s) if secret is not None else handle

    @property
    def handle_ttl_s(self) -> float:
        """How long a handle this producer returns stays valid (the store's time to live by default)."""
        return float(self.ctx.option("redis_ttl_s", 3600))

    def _maybe_release(self, request_id: str) -> None:
        if request_id in self._held and self._pending_saves.get(request_id, 0) <= 0 \
                and request_id not in self._loading and not self._is_held_elsewhere(request_id):
            del self._held[request_id]
            self._stats.set_blocks_held(sum(self._held.values()))
            self._released.append(request_id)


def handle_of(request: Request) -> KVTransferParams | None:
    """The request's transfer handle, parsed (None when it has none)."""
    raw = getattr(request, "kv_transfer_params", None)
    return KVTransferParams.from_dict(raw) if raw else None
