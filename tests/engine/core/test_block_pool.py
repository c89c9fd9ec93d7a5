"""Block pool and free-block queue: exact block ids, LRU eviction order, the hash map and KV events."""

from __future__ import annotations

import pytest

from pdserve.engine.core.block_pool import BlockPool
from pdserve.engine.core.free_block_queue import FreeBlockQueue, KVCacheBlock
from pdserve.engine.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 2  # block size: two tokens per block keeps the token lists short


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def pool_with(num_blocks: int = 6, events: bool = False) -> BlockPool:
    return BlockPool(num_blocks, BS, enable_caching=True, enable_kv_events=events)


def cache_all(pool: BlockPool, blocks, hashes, tokens=None) -> None:
    """Register every block of a 'request' whose table is ``blocks`` under ``hashes``."""
    tokens = tokens if tokens is not None else list(range(len(blocks) * BS))
    pool.cache_full_blocks(blocks, hashes, 0, len(hashes), tokens)


# ---------------------------------------------------------------------------- free block queue
def test_queue_keeps_insertion_order_and_pops_from_head():
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    assert ids(q) == [0, 1, 2, 3] and len(q) == 4
    assert q.popleft().block_id == 0
    q.append(blocks[0])
    assert ids(q) == [1, 2, 3, 0]


@pytest.mark.parametrize("victim, left", [(2, [0, 1, 3, 4]), (0, [1, 2, 3, 4]), (4, [0, 1, 2, 3])])
def test_queue_removes_from_anywhere_by_relinking_neighbours(victim, left):
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[victim])
    assert ids(q) == left and len(q) == 4
    assert blocks[victim] not in q
    assert blocks[victim].prev_free is None and blocks[victim].next_free is None
    # The neighbours point at each other: nothing was traversed or copied.
    if 0 < victim < 4:
        assert blocks[victim - 1].next_free is blocks[victim + 1]
        assert blocks[victim + 1].prev_free is blocks[victim - 1]


def test_queue_rejects_double_insert_and_removing_an_absent_block():
    blocks = [KVCacheBlock(i) for i in range(2)]
    q = FreeBlockQueue(blocks)
    with pytest.raises(ValueError):
        q.append(blocks[0])
    q.remove(blocks[0])
    with pytest.raises(ValueError):
        q.remove(blocks[0])
    q.popleft()
    with pytest.raises(IndexError):
        q.popleft()


# ---------------------------------------------------------------------------- allocation
def test_fresh_pool_hands_out_ids_in_order():
    pool = pool_with(6)
    assert pool.get_num_free_blocks() == 6 and pool.usage == 0.0
    assert ids(pool.get_new_blocks(2)) == [0, 1]
    assert ids(pool.get_new_blocks(3)) == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    assert pool.get_num_free_blocks() == 1 and pool.usage == pytest.approx(5 / 6)
    assert all(b.ref_cnt == 1 for b in pool.blocks[:5])


def test_allocating_more_than_free_raises():
    pool = pool_with(3)
    pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="only 1"):
        pool.get_new_blocks(2)


def test_freed_blocks_join_the_tail_in_the_given_order():
    pool = pool_with(6)
    table = pool.get_new_blocks(4)  # 0 1 2 3
    pool.free_blocks(reversed(table))
    assert pool.free_block_ids() == [4, 5, 3, 2, 1, 0]
    # LRU: untouched blocks first, then a sequence's tail before its head.
    assert ids(pool.get_new_blocks(4)) == [4, 5, 3, 2]


def test_shared_block_is_freed_only_by_its_last_holder():
    pool = pool_with(4)
    a = pool.get_new_blocks(1)
    pool.touch(a)
    pool.free_blocks(a)
    assert a[0].ref_cnt == 1 and not pool.is_free(a[0])
    pool.free_blocks(a)
    assert pool.is_free(a[0])
    with pytest.raises(ValueError, match="freed more times"):
        pool.free_blocks(a)


# ---------------------------------------------------------------------------- prefix cache
def test_touching_a_cached_free_block_takes_it_out_of_the_middle_of_the_queue():
    pool = pool_with(6)
    table = pool.get_new_blocks(3)  # 0 1 2
    cache_all(pool, table, [100, 101, 102])
    pool.free_blocks(reversed(table))
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    hit = pool.get_cached_block(101)
    assert hit is not None and hit.block_id == 1
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert pool.free_block_ids() == [3, 4, 5, 2, 0]
    assert pool.get_num_free_blocks() == 5
    # The revived block keeps its hash; the others are still cached but free.
    assert pool.get_cached_block(101) is hit and hit.block_hash == 101


def test_allocation_evicts_cached_blocks_least_recently_freed_first():
    pool = pool_with(4, events=True)
    table = pool.get_new_blocks(2)  # 0 1
    cache_all(pool, table, [100, 101])
    pool.take_events()
    pool.free_blocks(reversed(table))  # queue: 2 3 1 0
    assert ids(pool.get_new_blocks(3)) == [2, 3, 1]
    assert pool.get_cached_block(101) is None and pool.blocks[1].block_hash is None
    assert pool.get_cached_block(100) is pool.blocks[0]
    assert pool.take_events() == [BlockRemoved((101,))]


def test_duplicate_hash_keeps_the_first_block_and_leaves_the_copy_unregistered():
    pool = pool_with(4)
    first, copy = pool.get_new_blocks(1), pool.get_new_blocks(1)
    cache_all(pool, first, [100])
    cache_all(pool, copy, [100])
    assert pool.get_cached_block(100) is first[0]
    assert copy[0].block_hash is None
    assert pool.num_cached_blocks == 1


def test_cache_full_blocks_registers_only_the_new_range():
    pool = pool_with(6)
    table = pool.get_new_blocks(3)
    pool.cache_full_blocks(table, [100, 101, 102], 1, 2, list(range(6)))
    assert [b.block_hash for b in table] == [None, 101, None]


def test_caching_disabled_registers_nothing():
    pool = BlockPool(4, BS, enable_caching=False)
    table = pool.get_new_blocks(2)
    cache_all(pool, table, [100, 101])
    assert pool.get_cached_block(100) is None and table[0].block_hash is None


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use():
    pool = pool_with(4, events=True)
    table = pool.get_new_blocks(2)
    cache_all(pool, table, [100, 101])
    pool.take_events()
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(100) is table[0]
    pool.free_blocks(table)
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(100) is None and all(b.block_hash is None for b in pool.blocks)
    assert pool.take_events() == [AllBlocksCleared()]


# ---------------------------------------------------------------------------- KV events
def test_stored_events_carry_the_chain_parent_and_tokens():
    pool = pool_with(6, events=True)
    table = pool.get_new_blocks(3)
    tokens = [10, 11, 12, 13, 14, 15]
    pool.cache_full_blocks(table, [100, 101, 102], 0, 1, tokens)
    pool.cache_full_blocks(table, [100, 101, 102], 1, 3, tokens)
    assert pool.take_events() == [
        BlockStored((100,), None, (10, 11), BS),
        BlockStored((101, 102), 100, (12, 13, 14, 15), BS),
    ]
    assert pool.take_events() == []


def test_a_duplicate_in_the_middle_splits_the_stored_event_into_two_chains():
    pool = pool_with(6, events=True)
    other = pool.get_new_blocks(1)
    cache_all(pool, other, [101])  # someone else already holds the middle block's content
    pool.take_events()
    table = pool.get_new_blocks(3)
    cache_all(pool, table, [100, 101, 102], [1, 2, 3, 4, 5, 6])
    assert pool.take_events() == [
        BlockStored((100,), None, (1, 2), BS),
        BlockStored((102,), 101, (5, 6), BS),
    ]


def test_events_are_not_recorded_when_disabled():
    pool = pool_with(2, events=False)
    table = pool.get_new_blocks(2)
    cache_all(pool, table, [100, 101])
    pool.free_blocks(table)
    pool.get_new_blocks(2)
    assert pool.take_events() == []
