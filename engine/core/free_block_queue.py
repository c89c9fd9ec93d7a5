"""KV cache blocks and the doubly linked queue of free ones (the LRU eviction order of the prefix cache)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class KVCacheBlock:
    """One fixed-size block of KV cache slots.

    ``ref_cnt`` counts the running requests whose block table holds the block. ``block_hash`` is set while the
    block is full and registered in the prefix cache, None otherwise. ``prev_free`` / ``next_free`` are the
    block's links in the :class:`FreeBlockQueue`; both are None while the block is not in the queue.
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """The free blocks in eviction order::

        head <-> b3 <-> b7 <-> b1 <-> tail        (head and tail are sentinels, never handed out)
                 ^ popleft(): evicted next         ^ append(): freed last, evicted last

    The links live in the blocks themselves, so taking a cached free block out of the middle (a prefix-cache hit
    reuses it) is O(1) and needs no search; a Python ``deque`` would need O(n) for that.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block: KVCacheBlock) -> bool:
        # Every queued block has a predecessor (at worst the head sentinel); unqueued blocks have none.
        return block.prev_free is not None

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Head to tail (eviction order). O(n): for tests and debugging."""
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def popleft(self) -> KVCacheBlock:
        """Remove and return the block to evict next."""
        if self._len == 0:
            raise IndexError("no free blocks")
        block = self._head.next_free
        assert block is not None
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink ``block`` from wherever it is in the queue, in O(1)."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the tail: it is evicted after every block already queued."""
        if block in self:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1
