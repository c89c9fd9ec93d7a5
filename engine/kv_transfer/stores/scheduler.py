"""The scheduler half of the store connectors (``shared-fs``, ``redis``): finds a request's prompt blocks in the
store. Torch-free; it shares only the store client with the worker half (lookups are plain reads).

With tensor parallelism each rank writes its own heads under its own namespace (:mod:`..head_shards`): a block is
in the store when every shard a loading rank reads holds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from pdserve.engine.kv_transfer.base import KVConnectorContext, KVTransferParams
from pdserve.engine.kv_transfer.connector_scheduler import BlockConnectorScheduler
from pdserve.engine.kv_transfer.head_shards import senders_needed, shard_descriptor
from pdserve.engine.kv_transfer.metrics import KVTransferStats
from pdserve.engine.kv_transfer.prompt_blocks import PromptBlock
from pdserve.engine.kv_transfer.stores.store import BlockStore, ShardStores, block_key

if TYPE_CHECKING:
    from pdserve.engine.request import Request


class StoreConnectorScheduler(BlockConnectorScheduler):
    """Finds a request's prompt blocks in the store (a handle is optional: any stored prefix is reused)."""

    def __init__(self, ctx: KVConnectorContext, name: str, stats: KVTransferStats, store: BlockStore,
                 open_namespace: Callable[[str], BlockStore] | None = None) -> None:
        super().__init__(ctx, name, stats)
        self.store = store  # this cache's own namespace (rank 0's with tensor parallelism)
        self.shards = ShardStores(store, ctx.descriptor.namespace, open_namespace)

    def _lookup(self, request: Request, handle: KVTransferParams | None, wanted: list[PromptBlock]
                ) -> tuple[int, dict[str, Any]]:
        keys = [block_key(b.block_hash) for b in wanted]
        sender_tp = self.sender_tp(handle)
        own_tp = self.ctx.descriptor.tp_size
        return min(self._store_of(sender_tp, rank).count_prefix(keys)
                   for rank in senders_needed(self.ctx.kv_heads, sender_tp, own_tp)), {}

    def _contains(self, hashes: list[int]) -> list[bool]:
        keys = [block_key(h) for h in hashes]
        tp = self.ctx.descriptor.tp_size
        present = [True] * len(keys)
        for rank in range(tp):  # every rank wrote (or must write) its own heads
            present = [a and b for a, b in zip(present, self._store_of(tp, rank).contains(keys))]
        return present

    def _store_of(self, tp_size: int, tp_rank: int) -> BlockStore:
        return self.shards.get(shard_descriptor(self.ctx.descriptor, self.ctx.kv_heads, tp_size, tp_rank).namespace)
