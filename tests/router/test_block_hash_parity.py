"""The router hashes prompts exactly like the engine: property test against the engine's own KV cache manager.

The engine side is the real :class:`KVCacheManager` with KV events on: it allocates a request's prompt, caches its
full blocks and reports their hashes in ``BlockStored`` events. The router side is :class:`PromptHasher`.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.core.kv_cache_manager import KVCacheManager
from pdserve.engine.core.kv_events import BlockStored
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.services.router.hashing import PromptHasher
from pdserve.services.router.prefix_index import PrefixIndex


def _engine_stored_hashes(tokens, block_size, seed, algo, salt):
    mgr = KVCacheManager(block_size=block_size, num_blocks=len(tokens) // block_size + 4, hash_seed=seed,
                         hash_algo=algo, enable_kv_events=True)
    req = Request("r", list(tokens), SamplingParams(max_tokens=1), cache_salt=salt)
    assert mgr.allocate_slots(req, len(tokens)) is not None
    hashes = []
    for event in mgr.take_events():
        if isinstance(event, BlockStored):
            hashes.extend(event.block_hashes)
    return hashes, mgr


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.integers(0, 200_000), min_size=1, max_size=200),
       block_size=st.sampled_from([1, 2, 4, 16, 32]),
       seed=st.integers(0, 2**64 - 1),
       algo=st.sampled_from(["sha256", "blake2b"]),
       salt=st.one_of(st.none(), st.text(min_size=1, max_size=8)))
def test_router_hashes_equal_engine_hashes(tokens, block_size, seed, algo, salt):
    engine_hashes, _ = _engine_stored_hashes(tokens, block_size, seed, algo, salt)
    router_hashes = PromptHasher(block_size, seed, algo).hash_prompt(tokens, salt)
    assert router_hashes == engine_hashes
    assert len(router_hashes) == len(tokens) // block_size


@settings(max_examples=50, deadline=None)
@given(prefix=st.lists(st.integers(0, 50_000), min_size=8, max_size=64),
       suffix=st.lists(st.integers(0, 50_000), min_size=0, max_size=64))
def test_engine_events_make_the_router_index_match_the_shared_prefix(prefix, suffix):
    """Events from an engine that served ``prefix`` let the router find exactly its full blocks in a new prompt."""
    bs = 4
    engine_hashes, mgr = _engine_stored_hashes(prefix, bs, 0, "sha256", None)
    index = PrefixIndex()
    index.apply("pod", BlockStored(tuple(engine_hashes), None, tuple(prefix[:len(engine_hashes) * bs]), bs))
    prompt = prefix + suffix
    matched = index.match(PromptHasher(bs).hash_prompt(prompt), ["pod", "other"])
    assert matched == {"pod": len(prefix) // bs, "other": 0}


def test_different_seed_or_block_size_never_matches():
    tokens = list(range(64))
    base = PromptHasher(16).hash_prompt(tokens)
    assert not set(base) & set(PromptHasher(16, seed=1).hash_prompt(tokens))
    assert not set(base) & set(PromptHasher(8).hash_prompt(tokens))
