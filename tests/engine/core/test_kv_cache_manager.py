"""KV cache manager: exact block tables, prefix hits (capped, chained, salted), partial blocks and failures."""

from __future__ import annotations

import pytest

from pdserve.engine.core.block_hash import BlockHasher
from pdserve.engine.core.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams

BS = 4


def manager(num_blocks: int = 8, caching: bool = True, max_model_len: int = 64) -> KVCacheManager:
    return KVCacheManager(BS, num_blocks, enable_prefix_caching=caching, hash_seed=0, hash_algo="sha256",
                          max_model_len=max_model_len)


def req(rid: str, tokens, salt: str | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(), cache_salt=salt)


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None) -> list[int] | None:
    """What the scheduler does for a waiting request: look up the prefix, allocate the rest (or ``num_new``)."""
    computed, num_cached = kv.get_computed_blocks(r)
    n = r.num_tokens - num_cached if num_new is None else num_new
    block_ids = kv.allocate_slots(r, n, computed, num_cached)
    if block_ids is not None:
        r.num_computed_tokens = num_cached + n
    return block_ids


def hit(kv: KVCacheManager, r: Request) -> tuple[list[int], int]:
    blocks, n = kv.get_computed_blocks(r)
    return [b.block_id for b in blocks], n


# ---------------------------------------------------------------------------- prefix lookups
@pytest.mark.parametrize("a_tokens, b_tokens, expected", [
    # (first request's tokens, second request's tokens, second's hit: block ids, tokens)
    (range(10), range(10), ([0, 1], 8)),  # two full blocks cached, the partial third is not
    (range(8), range(8), ([0], 4)),  # capped: the last token must be computed, so one block short
    (range(8), range(9), ([0, 1], 8)),  # one more token: both blocks usable
    (range(12), [0, 1, 2, 3, 9, 9, 9, 9, 8], ([0], 4)),  # diverges in the second block
    (range(12), [9, 9, 9, 9, 4, 5, 6, 7, 8], ([], 0)),  # same second block, other parent: chained, no hit
    (range(3), range(3), ([], 0)),  # nothing full
])
def test_second_request_hits_the_first_ones_full_blocks(a_tokens, b_tokens, expected):
    kv = manager()
    assert admit(kv, req("a", a_tokens)) is not None
    assert hit(kv, req("b", b_tokens)) == expected


def test_cache_salt_separates_identical_prompts():
    kv = manager()
    admit(kv, req("a", range(9), salt="tenant-1"))
    assert hit(kv, req("b", range(9), salt="tenant-2")) == ([], 0)
    assert hit(kv, req("c", range(9), salt="tenant-1")) == ([0, 1], 8)
    assert hit(kv, req("d", range(9))) == ([], 0)


def test_lookup_fills_request_block_hashes_with_the_shared_hasher():
    kv = manager()
    r = req("a", range(10))
    kv.get_computed_blocks(r)
    assert r.block_hashes == BlockHasher(BS, 0, "sha256").hash_prefix(list(range(8)))


def test_freed_blocks_stay_findable_until_evicted():
    kv = manager(num_blocks=4)
    a = req("a", range(9))
    assert admit(kv, a) == [0, 1, 2]
    kv.free(a)
    assert kv.pool.free_block_ids() == [3, 2, 1, 0]  # tail of the table first
    assert hit(kv, req("b", range(9))) == ([0, 1], 8)
    assert admit(kv, req("c", [7] * 13)) == [3, 2, 1, 0]  # evicts everything, LRU order
    assert hit(kv, req("d", range(9))) == ([], 0)


def test_caching_disabled_never_hits_nor_counts():
    kv = manager(caching=False)
    admit(kv, req("a", range(9)))
    b = req("b", range(9))
    assert hit(kv, b) == ([], 0) and b.block_hashes == []
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)


# ---------------------------------------------------------------------------- allocation
def test_hit_blocks_are_shared_and_the_rest_is_fresh():
    kv = manager()
    admit(kv, req("a", range(10)))  # [0, 1, 2]
    b = req("b", list(range(8)) + [50, 51, 52, 53, 54])
    assert admit(kv, b) == [0, 1, 3, 4]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:5]] == [2, 2, 1, 1, 1]
    assert b.num_computed_tokens == 13
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 13, 8)


def test_chunks_fill_partial_blocks_and_cache_them_once_full():
    kv = manager()
    a = req("a", range(10))
    assert admit(kv, a, num_new=5) == [0, 1]
    assert [b.block_hash is not None for b in kv.pool.blocks[:2]] == [True, False]
    assert kv.allocate_slots(a, 5) == [0, 1, 2]
    a.num_computed_tokens = 10
    assert [b.block_hash is not None for b in kv.pool.blocks[:3]] == [True, True, False]


def test_decode_adds_a_block_only_when_the_last_one_is_full():
    kv = manager()
    a = req("a", range(7))
    assert admit(kv, a) == [0, 1]
    for step, expected in enumerate([[0, 1], [0, 1, 2], [0, 1, 2]]):
        a.append_output_token(100 + step)
        assert kv.allocate_slots(a, 1) == expected
        a.num_computed_tokens += 1
    # The second block became full with the first decoded token, so it is cached and its hash covers it.
    assert len(a.block_hashes) == 2 and kv.pool.blocks[1].block_hash == a.block_hashes[1]


def test_failed_allocation_changes_nothing():
    kv = manager(num_blocks=3)
    a = req("a", range(8))
    admit(kv, a)  # [0, 1]
    b = req("b", [9] * 9)
    assert admit(kv, b) is None
    assert kv.get_num_free_blocks() == 1 and kv.get_block_ids(b) == []
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (8, 0)  # only the admitted request counted


@pytest.mark.parametrize("b_len, expected", [
    (16, [0, 1, 2, 3]),  # 2 hits revived from the free queue + 2 new blocks: exactly the pool
    (17, None),  # needs 3 new blocks but reviving the hits leaves only 2 allocatable
])
def test_hits_sitting_in_the_free_queue_do_not_count_as_allocatable(b_len, expected):
    kv = manager(num_blocks=4)
    a = req("a", range(8))
    admit(kv, a)
    kv.free(a)
    assert kv.get_num_free_blocks() == 4
    assert admit(kv, req("b", range(b_len))) == expected
    if expected is None:
        assert kv.get_num_free_blocks() == 4 and kv.pool.num_cached_blocks == 2


def test_free_releases_shared_blocks_only_with_the_last_holder():
    kv = manager(num_blocks=6)
    a, b = req("a", range(9)), req("b", range(9))
    admit(kv, a)  # [0, 1, 2]
    admit(kv, b)  # [0, 1, 3]
    kv.free(a)
    assert kv.pool.free_block_ids() == [4, 5, 2]
    kv.free(b)
    assert kv.pool.free_block_ids() == [4, 5, 2, 3, 1, 0]
    assert kv.usage == 0.0 and kv.get_block_ids(a) == []


def test_allocation_beyond_max_model_len_is_a_bug():
    kv = manager(max_model_len=8)
    with pytest.raises(ValueError, match="max_model_len"):
        kv.allocate_slots(req("a", range(9)), 9)


def test_computed_tokens_must_fill_the_computed_blocks():
    kv = manager()
    with pytest.raises(ValueError, match="do not fill"):
        kv.allocate_slots(req("a", range(9)), 5, [], 4)
