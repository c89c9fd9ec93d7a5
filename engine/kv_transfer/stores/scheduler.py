"""The scheduler half of the store connectors (``shared-fs``, ``redis``): finds a request's prompt blocks in the
store. Torch-free; it shares only the store client with the worker half (lookups are plain reads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdserve.engine.kv_transfer.base import KVConnectorContext, KVTransferParams
from pdserve.engine.kv_transfer.connector_scheduler import BlockConnectorScheduler
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.kv_transfer.prompt_blocks import PromptBlock
from pdserve.engine.kv_transfer.stores.store import BlockStore, block_key

if TYPE_CHECKING:
    from pdserve.engine.request import Request


class StoreConnectorScheduler(BlockConnectorScheduler):
    """Finds a request's prompt blocks in the store (a handle is optional: any stored prefix is reused)."""

    def __init__(self, ctx: KVConnectorContext, name: str, stats: KVTransferStats, store: BlockStore) -> None:
        super().__init__(ctx, name, stats)
        self.store = store

    def _lookup(self, request: Request, handle: KVTransferParams | None, wanted: list[PromptBlock]
                ) -> tuple[int, dict[str, Any]]:
        return self.store.count_prefix([block_key(b.block_hash) for b in wanted]), {}

    def _contains(self, hashes: list[int]) -> list[bool]:
        return self.store.contains([block_key(h) for h in hashes])
