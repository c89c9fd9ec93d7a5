"""The scheduler half of the ``grpc`` connector: holds finished prefills for their peers under a lease and turns
transfer handles into pull specs on the decode side. Torch-free and grpc-free; it shares nothing with the worker
half but metadata: transfers to serve and releases go down in :class:`KVConnectorMetadata`, released and expired
transfers come back in :class:`KVConnectorOutput`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pdserve.engine.kv_transfer.base import (BlockRef, KVConnectorContext, KVConnectorMetadata, KVConnectorOutput,
                                             KVHandleError, KVTransferParams, ServeSpec)
from pdserve.engine.kv_transfer.block_format import KVFormatError
from pdserve.engine.kv_transfer.connector_scheduler import BlockConnectorScheduler, handle_of
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.security import CLOCK_SKEW_S
from pdserve.engine.kv_transfer.prompt_blocks import PromptBlock, extra_keys_of, prompt_blocks

if TYPE_CHECKING:
    from pdserve.engine.core.sched_output import SchedulerOutput
    from pdserve.engine.request import Request

logger = logging.getLogger(__name__)


class GrpcConnectorScheduler(BlockConnectorScheduler):
    """Holds finished prefills for their peers; turns handles into pull specs on the decode side."""

    saves_blocks = False
    loads_without_handle = False  # blocks live in some prefill pod: only a handle says which

    def __init__(self, ctx: KVConnectorContext, stats: KVTransferStats, address: str | None) -> None:
        super().__init__(ctx, "grpc", stats)
        self.address = address  # the worker's KV server, as peers reach it
        self.lease_s = float(ctx.option("kv_lease_s", 60.0))
        # transfer token -> request id: the KV server knows transfers only by their random token
        self._request_of: dict[str, str] = {}
        self._token_of: dict[str, str] = {}
        # Consumer: requests whose pull started (the worker releases those), and releases to hand the worker.
        self._pulled: set[str] = set()
        self._pending_releases: list[tuple[str, str, str]] = []  # (request id, KV server, transfer id)
        self._pending_serve: list[ServeSpec] = []  # producer: transfers for the worker to start serving
        # Consumer: loads read by several tensor-parallel ranks (or from several): request id -> (KV servers,
        # transfer id), released once every rank reported the load (no rank releases what another still reads).
        self._sharded_pulls: dict[str, tuple[str, str]] = {}

    @property
    def handle_ttl_s(self) -> float:
        # The blocks are gone after the lease, so a later handle could only fail its pull; the pods' clocks differ
        # by up to the allowed skew, so the handle outlives the lease by that much (the KV server has the last say).
        return self.lease_s + CLOCK_SKEW_S

    def _lookup(self, request: Request, handle: KVTransferParams | None, wanted: list[PromptBlock]
                ) -> tuple[int, dict[str, Any]]:
        if handle is None or not handle.kv_server:
            raise KVFormatError("the transfer handle names no KV server")
        # Trust the handle: asking the peer now would cost a round trip per admission; the pull will tell.
        return len(wanted), {"kv_server": handle.kv_server, "transfer_id": handle.transfer_id}

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        super().update_state_after_alloc(request, block_ids, num_external_tokens)
        rid = request.request_id
        if rid in self._loading:
            self._pulled.add(rid)
            source = self._pending_loads[-1].source  # the load just queued
            if self.ctx.descriptor.tp_size > 1 or int(source.get("sender_tp", 1)) > 1:
                self._sharded_pulls[rid] = (source["kv_server"], source["transfer_id"])

    def build_connector_meta(self, sched_out: SchedulerOutput) -> KVConnectorMetadata:
        meta = super().build_connector_meta(sched_out)
        meta.serve, self._pending_serve = self._pending_serve, []
        pending, self._pending_releases = self._pending_releases, []
        meta.releases = [(address, tid) for _, address, tid in pending]
        for rid, _, _ in pending:
            self._maybe_release(rid)  # handed to the worker: the (usually empty) hold can end
        return meta

    def has_pending_work(self) -> bool:
        return super().has_pending_work() or bool(self._request_of or self._pending_releases or self._pending_serve)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        release = self._unpulled_transfer(request) if rid not in self._pulled else None
        self._pulled.discard(rid)
        hold, params = super().request_finished(request, block_ids)
        if release is not None:
            # Abandoned before its pull (client gone, aborted while waiting, prefix all cached here): the prefill
            # pod would hold the blocks until the lease ends. Hold until the next step hands the release over.
            self._pending_releases.append((rid, *release))
            self._held[rid] = len(block_ids)
            self._stats.set_blocks_held(sum(self._held.values()))
            hold = True
        if params is not None:
            blocks = prompt_blocks(self.hasher, request.prompt_token_ids, extra_keys_of(request))
            refs = [BlockRef(block_ids[b.index], b.block_hash, b.num_tokens, b.index) for b in blocks]
            token = params["transfer_id"]
            self._pending_serve.append(ServeSpec(token, tuple(refs), self.lease_s))
            self._request_of[token] = request.request_id
            self._token_of[request.request_id] = token
            self._held[request.request_id] = len(block_ids)
            self._stats.set_blocks_held(sum(self._held.values()))
            hold = True
        return hold, params

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        super().update_connector_output(output)
        for rid in output.finished_loading | set(output.failed_loading):
            pulled = self._sharded_pulls.pop(rid, None)
            if pulled is not None:
                self._pending_releases.append((rid, *pulled))
        for transfer_id in output.released:
            self._maybe_release(self._forget(transfer_id))
        for transfer_id in output.expired:
            rid = self._forget(transfer_id)
            logger.warning("KV transfer of request %s: lease of %.0f s expired before a decode pod released it; "
                           "freeing its blocks", rid, self.lease_s)
            self._stats.record_failure("lease_expired")
            self._maybe_release(rid)

    def _unpulled_transfer(self, request: Request) -> tuple[str, str] | None:
        """``(KV server, transfer id)`` of the verified handle a consumer request carries, if any."""
        if not self.ctx.is_consumer or not request.kv_transfer_params or self.ctx.cluster_secret is None:
            return None
        try:
            handle = handle_of(request)
            if handle is None or handle.connector != self.name or not handle.kv_server:
                return None
            handle.verify(self.ctx.cluster_secret)  # never dial an address nobody vouched for
        except KVHandleError:
            return None
        return handle.kv_server, handle.transfer_id

    def _is_held_elsewhere(self, request_id: str) -> bool:
        return request_id in self._token_of  # served until the worker reports it released or expired

    def _forget(self, transfer_id: str) -> str:
        """The request id of a transfer that ended (released or expired); its token is forgotten."""
        rid = self._request_of.pop(transfer_id, transfer_id)
        self._token_of.pop(rid, None)
        return rid

    def _kv_server_address(self) -> str | None:
        return self.address
