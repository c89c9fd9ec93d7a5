"""The scheduler half of the ``grpc`` connector: holds finished prefills for their peers under a lease and turns
transfer handles into pull specs on the decode side. Torch-free and grpc-free."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pdserve.engine.kv_transfer.base import BlockRef, KVConnectorContext, KVConnectorOutput, KVTransferParams
from pdserve.engine.kv_transfer.block_format import KVFormatError
from pdserve.engine.kv_transfer.connector_scheduler import BlockConnectorScheduler
from pdserve.engine.kv_transfer.grpc.transfers import TransferRegistry
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.security import CLOCK_SKEW_S
from pdserve.engine.kv_transfer.prompt_blocks import PromptBlock, extra_keys_of, prompt_blocks

if TYPE_CHECKING:
    from pdserve.engine.request import Request

logger = logging.getLogger(__name__)


class GrpcConnectorScheduler(BlockConnectorScheduler):
    """Holds finished prefills for their peers; turns handles into pull specs on the decode side."""

    saves_blocks = False
    loads_without_handle = False  # blocks live in some prefill pod: only a handle says which

    def __init__(self, ctx: KVConnectorContext, stats: KVTransferStats, registry: TransferRegistry,
                 address: str | None) -> None:
        super().__init__(ctx, "grpc", stats)
        self.registry = registry
        self.address = address
        self.lease_s = float(ctx.option("kv_lease_s", 60.0))
        # transfer token -> request id: the KV server knows transfers only by their random token
        self._request_of: dict[str, str] = {}
        self._token_of: dict[str, str] = {}

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

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        hold, params = super().request_finished(request, block_ids)
        if params is not None:
            blocks = prompt_blocks(self.hasher, request.prompt_token_ids, extra_keys_of(request))
            refs = [BlockRef(block_ids[b.index], b.block_hash, b.num_tokens, b.index) for b in blocks]
            token = params["transfer_id"]
            self.registry.add(token, refs, self.lease_s)
            self._request_of[token] = request.request_id
            self._token_of[request.request_id] = token
            self._held[request.request_id] = len(block_ids)
            self._stats.set_blocks_held(sum(self._held.values()))
            hold = True
        return hold, params

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        super().update_connector_output(output)
        for transfer_id in output.released:
            self._maybe_release(self._forget(transfer_id))

    def take_released(self) -> list[str]:
        for transfer_id in self.registry.expire():
            rid = self._forget(transfer_id)
            logger.warning("KV transfer of request %s: lease of %.0f s expired before a decode pod released it; "
                           "freeing its blocks", rid, self.lease_s)
            self._stats.record_failure("lease_expired")
            self._maybe_release(rid)
        return super().take_released()

    def has_pending_work(self) -> bool:
        return super().has_pending_work() or len(self.registry) > 0

    def _is_held_elsewhere(self, request_id: str) -> bool:
        token = self._token_of.get(request_id)
        return token is not None and token in self.registry

    def _forget(self, transfer_id: str) -> str:
        """The request id of a transfer that ended (released or expired); its token is forgotten."""
        rid = self._request_of.pop(transfer_id, transfer_id)
        self._token_of.pop(rid, None)
        return rid

    def _kv_server_address(self) -> str | None:
        return self.address
