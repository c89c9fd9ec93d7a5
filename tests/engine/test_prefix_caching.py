"""Prefix caching is visible in the engine's counters and does not change outputs."""

from __future__ import annotations

from pdserve import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model


def test_shared_long_prefix_computes_only_new_tokens(tmp_path) -> None:
    model_dir = make_tiny_model("llama", tmp_path / "m", max_position_embeddings=1024)
    prefix = [(i * 7919) % 500 + 3 for i in range(520)]  # >= 512 shared tokens
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    params = SamplingParams(max_tokens=4, temperature=0.0)

    cold = LLM(str(model_dir), enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in cold.generate([first, second], params)]

    llm = LLM(str(model_dir), block_size=16)
    core = llm.engine.core
    out1 = llm.generate([first], params)[0]
    before = core.num_computed_tokens_total
    out2 = llm.generate([second], params)[0]
    computed = core.num_computed_tokens_total - before

    cached = (len(prefix) // 16) * 16  # full shared blocks
    assert out2.num_cached_tokens == cached
    # Only the uncached tail of the prompt plus the decode steps ran through the model.
    assert computed == (len(second) - cached) + (4 - 1)
    assert [out1.outputs[0].token_ids, out2.outputs[0].token_ids] == expected
    stats = core.get_stats()
    assert stats.prefix_cache_hits >= cached
