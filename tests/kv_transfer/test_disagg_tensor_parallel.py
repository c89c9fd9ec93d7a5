"""Prefill and decode engines of different tensor-parallel sizes, through every connector (issue 15, acceptance 3).

TP=1 -> TP=3 and TP=3 -> TP=1 on the bundled model (9 query heads, 3 KV heads: a TP=3 rank holds one KV head),
TP=1 <-> TP=2 on a tiny random Llama (2 KV heads). Every rank saves or serves its own heads; the loading ranks pick
theirs out of the producer's shards. Greedy answers equal the monolithic engine's, the decode engine computes only
the prefill's first token of each prompt, and both engines end with every block free and nothing held.

Each parallel engine starts one worker process per rank (gloo on CPU, float32): that start-up is the cost of this
file, so a test runs both directions on one connector with the fewest engines (tiny prompts, few tokens).
"""

from __future__ import annotations

import pytest

from disagg_helpers import disagg, engine, monolithic, options_for, prompts_of, settle
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONNECTORS = ["shared-fs", "redis", "grpc"]
BUNDLED = "smollm2-135m-instruct"
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")  # 4 query heads, 2 KV heads


def _check_freed(*engines) -> None:
    """Every block back in the pool, nothing held for a peer, no transfer left in flight (all ranks reported)."""
    settle(*engines)
    for eng in engines:
        sched = eng.core.scheduler
        assert sched.kv_cache_manager.get_num_free_blocks() == eng.core.runner.num_blocks
        assert not sched.kv_connector.has_pending_work()
        assert sched.kv_connector.stats.snapshot().blocks_held == 0


def _round_trip(model: str, connector: str, prompts: list[list[int]], tps: tuple[int, int], opts: dict) -> None:
    """Prefill at ``tps[0]`` -> decode at ``tps[1]``, then back, each pair against the monolithic engine."""
    want = monolithic(model, prompts, MAX_TOKENS)
    for prefill_tp, decode_tp in (tps, tps[::-1]):
        p = engine(model, "prefill", connector, {"tensor_parallel_size": prefill_tp}, **opts)
        d = engine(model, "decode", connector, {"tensor_parallel_size": decode_tp}, **opts)
        try:
            assert disagg(p, d, prompts, tag=f"tp{prefill_tp}", max_tokens=MAX_TOKENS) == want, \
                f"TP={prefill_tp} -> TP={decode_tp}"
            # The decode engine computed the prefill's first token of each prompt and decoded, nothing more.
            assert d.core.num_computed_tokens_total == len(prompts) * (MAX_TOKENS - 1)
            blocks = sum(-(-len(p) // 16) for p in prompts)
            assert d.core.scheduler.kv_connector.stats.snapshot().blocks["load"] == blocks
            _check_freed(p, d)
        finally:
            p.core.shutdown()
            d.core.shutdown()


@pytest.mark.parametrize("connector", CONNECTORS)
def test_bundled_model_tp1_to_tp3_and_back(connector, tmp_path, redis_url):
    # 5 and 21 tokens (16-token blocks): a partial block alone, and a full block plus a partial one.
    prompts = prompts_of([5, 21], vocab=49152, seed=3)
    _round_trip(BUNDLED, connector, prompts, (1, 3), options_for(connector, tmp_path, redis_url))


@pytest.mark.parametrize("connector", CONNECTORS)
def test_tiny_model_tp1_to_tp2_and_back(connector, tiny_llama, tmp_path, redis_url):
    prompts = prompts_of([7, 33])
    _round_trip(tiny_llama, connector, prompts, (1, 2), options_for(connector, tmp_path, redis_url))
