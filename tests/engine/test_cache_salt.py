"""``cache_salt``: requests with different salts never share prefix-cached blocks; equal salts do.

Exact: the cached-token counts of each request, and the hashes of the cached blocks, which are the router's
(:class:`~pdserve.services.router.hashing.PromptHasher`) for the same salt.
"""

from __future__ import annotations

import pytest

from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.services.router.hashing import PromptHasher
from tests.helpers.tiny_models import make_tiny_model

PROMPT = list(range(3, 43))  # 40 tokens: 2 full blocks of 16 and a partial one


@pytest.fixture(scope="module")
def eng(tmp_path_factory) -> LLMEngine:
    model = make_tiny_model("llama", tmp_path_factory.mktemp("m"), max_position_embeddings=128)
    return LLMEngine.from_kwargs(model, device="cpu", num_blocks=32, block_size=16, enable_prefix_caching=True)


def cached_tokens(eng: LLMEngine, rid: str, salt: str | None) -> int:
    eng.add_request(PROMPT, SamplingParams(max_tokens=2, temperature=0.0, cache_salt=salt), request_id=rid)
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final = out
    return final.num_cached_tokens


def test_salts_partition_the_prefix_cache(eng: LLMEngine) -> None:
    assert cached_tokens(eng, "a", "tenant-1") == 0
    assert cached_tokens(eng, "b", "tenant-2") == 0  # same prompt, other tenant: no hit
    assert cached_tokens(eng, "c", None) == 0  # no salt is its own partition too
    assert cached_tokens(eng, "d", "tenant-1") == 32  # same tenant: both full blocks hit
    assert cached_tokens(eng, "e", None) == 32
    pool = eng.core.scheduler.kv_cache_manager.pool
    hasher = PromptHasher(16, eng.config.cache.hash_seed, eng.config.cache.hash_algo)
    for salt in ("tenant-1", "tenant-2", None):
        hashes = hasher.hash_prompt(PROMPT, salt)
        assert len(hashes) == 2 and all(pool.get_cached_block(h) is not None for h in hashes)
    assert len({tuple(hasher.hash_prompt(PROMPT, s)) for s in ("tenant-1", "tenant-2", None)}) == 3
