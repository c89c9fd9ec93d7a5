"""The pool of KV cache blocks: allocation, reference counts and the prefix cache (hash -> block).

A block is in exactly one of three states::

    in use          ref_cnt > 0, not in the free queue, hash set if it is full and cached
    free, cached    ref_cnt == 0, in the free queue, hash set: a prefix hit can still revive it (touch)
    free, empty     ref_cnt == 0, in the free queue, no hash

Allocation takes blocks from the head of the free queue (least recently freed first); a block taken that way
loses its hash, which is how the prefix cache evicts. Freed blocks go to the tail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pdserve.engine.core.free_block_queue import FreeBlockQueue, KVCacheBlock
from pdserve.engine.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` slots with ids ``0 .. num_blocks - 1`` (none reserved)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 enable_kv_events: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.enable_kv_events = enable_kv_events
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)
        self._cached: dict[int, KVCacheBlock] = {}
        self._events: list[KVCacheEvent] = []

    # ------------------------------------------------------------------ allocation
    def get_num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free ones, cached or not)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, in [0, 1]; cached free blocks count as free."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the head of the free queue, each with ``ref_cnt == 1``.

        Blocks that still carried a hash leave the prefix cache (one ``BlockRemoved`` event for the call).
        """
        if num_blocks > len(self._free):
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {len(self._free)} are free")
        blocks, evicted = [], []
        for _ in range(num_blocks):
            block = self._free.popleft()
            if block.block_hash is not None:
                evicted.append(self._evict(block))
            block.ref_cnt = 1
            blocks.append(block)
        if evicted and self.enable_kv_events:
            self._events.append(BlockRemoved(tuple(evicted)))
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache; a free one leaves the free queue (O(1))."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block; blocks reaching zero join the tail of the free queue in the given order.

        The order is the eviction order among them, so callers pass a request's table tail first: the end of a
        sequence is the least likely part to be shared and should be evicted first.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more times than it was taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    # ------------------------------------------------------------------ prefix cache
    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        """The block holding the full block with this hash, if it is still cached (in use or free)."""
        return self._cached.get(block_hash)

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[int],
                          num_cached_blocks: int, num_full_blocks: int, token_ids: Sequence[int]) -> None:
        """Register ``blocks[num_cached_blocks:num_full_blocks]`` of one request under their hashes.

        ``blocks`` is the request's block table, ``block_hashes`` its chained hashes (at least ``num_full_blocks``
        of them) and ``token_ids`` its tokens (for events). A block whose hash another block already holds stays
        unregistered: the first copy serves future hits, and the map keeps one block per hash.
        """
        if not self.enable_caching:
            return
        run: list[int] = []  # one BlockStored per unbroken chain of newly registered blocks
        run_start = num_cached_blocks
        for i in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block
                if not run:
                    run_start = i
                run.append(block_hash)
            elif run:
                self._record_stored(run, run_start, block_hashes, token_ids)
                run = []
        if run:
            self._record_stored(run, run_start, block_hashes, token_ids)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (returns False) while any block is in use, whose hash would lie."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if self.enable_kv_events:
            self._events.append(AllBlocksCleared())
        return True

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def take_events(self) -> list[KVCacheEvent]:
        """Return and clear the events recorded since the last call (always empty when events are disabled)."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ inspection (tests, debugging)
    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (head first). O(n)."""
        return [b.block_id for b in self._free]

    def is_free(self, block: KVCacheBlock) -> bool:
        """Whether the block sits in the free queue (O(1))."""
        return block in self._free

    # ------------------------------------------------------------------ internals
    def _evict(self, block: KVCacheBlock) -> int:
        block_hash = block.block_hash
        assert block_hash is not None and self._cached.get(block_hash) is block
        del self._cached[block_hash]
        block.block_hash = None
        return block_hash

    def _record_stored(self, run: list[int], start: int, block_hashes: Sequence[int],
                       token_ids: Sequence[int]) -> None:
        if not self.enable_kv_events:
            return
        bs = self.block_size
        parent = block_hashes[start - 1] if start > 0 else None
        tokens = tuple(token_ids[start * bs:(start + len(run)) * bs])
        self._events.append(BlockStored(tuple(run), parent, tokens, bs))
