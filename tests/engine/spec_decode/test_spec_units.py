"""Configuration, proposers and adaptive k, each on its own."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec_decode.adaptive import AdaptiveK
from pdserve.engine.spec_decode.config import SpeculativeConfig
from pdserve.engine.spec_decode.proposers import NgramProposer, OracleProposer, ngram_lookup


@pytest.mark.parametrize("method", ["eagle", "eagle3", "medusa"])
def test_head_methods_need_their_checkpoint(method: str) -> None:
    with pytest.raises(ValueError, match=f'"{method}" needs "model"'):
        SpeculativeConfig.parse({"method": method})
    assert SpeculativeConfig.parse({"method": method, "model": "/heads/x"}).model == "/heads/x"


@pytest.mark.parametrize("value, match", [
    ("{", "not valid JSON"), ('["ngram"]', "JSON object"), ('{"method": "lookahead"}', "unknown speculative"),
    ('{"num_speculative_tokens": 0}', "positive integer"), ('{"k": 3}', "unknown speculative_config keys"),
    ('{"prompt_lookup_min": 5, "prompt_lookup_max": 2}', "exceeds"), ('{"oracle_acceptance": 1.5}', r"\[0, 1\]"),
    ('{"method": "draft_model"}', "needs \"model\""),
    ('{"method": "draft_model", "model": "x", "draft_kv_cache_gib": 0}', "positive number")])
def test_bad_configs_are_refused(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(value)


def test_prefill_role_refuses_speculation() -> None:
    from pdserve.engine.config import EngineConfig

    with pytest.raises(ValueError, match="prefill pod never"):
        EngineConfig.create("llama-3.1-8b", load_format="dummy", role="prefill",
                            speculative_config='{"method": "ngram"}')
    config = EngineConfig.create("llama-3.1-8b", load_format="dummy", role="decode",
                                 speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    assert config.speculative.num_speculative_tokens == 3


def test_ngram_lookup_prefers_the_longest_and_latest_match() -> None:
    tokens = np.array([1, 2, 3, 9, 9, 5, 2, 3, 4, 6, 7, 8, 2, 3])
    assert ngram_lookup(tokens, 1, 3, 3) == [4, 6, 7]  # "2 3" last seen before 4 (the latest occurrence)
    assert ngram_lookup(np.array([5, 6, 7, 1, 6, 7]), 2, 2, 4) == [1, 6, 7]  # cut at the end of the sequence
    assert ngram_lookup(np.array([1, 2, 3, 4]), 1, 3, 2) == []  # nothing repeats
    assert ngram_lookup(np.array([1, 2, 3, 1, 2, 8, 1, 2, 3]), 2, 3, 2) == [1, 2]  # "1 2 3" beats "2 3"'s later hit
    req = Request("r", [4, 5, 6, 7, 4, 5], SamplingParams())
    assert NgramProposer(2, 4).propose(req, 2) == [6, 7]


def test_oracle_replays_with_the_asked_acceptance(tmp_path) -> None:
    path = tmp_path / "o.json"
    path.write_text('[{"prompt_token_ids": [1, 2], "output_token_ids": [10, 11, 12, 13, 14, 15]}]')
    oracle = OracleProposer(vocab_size=16, path=str(path))
    req = Request("r", [1, 2], SamplingParams())
    req.output_token_ids = [10]
    assert oracle.propose(req, 4) == [11, 12, 13, 14]
    oracle.acceptance = 0.5
    assert oracle.propose(req, 4) == [11, 12, 14, 15]
    oracle.acceptance = 0.0
    assert oracle.propose(req, 4) == [12, 13, 14, 15]
    req.output_token_ids = [9]  # went its own way
    assert oracle.propose(req, 4) == []
    assert oracle.propose(Request("s", [3], SamplingParams()), 4) == []
    done = Request("d", [3], SamplingParams())
    done.output_token_ids = [4, 5]
    oracle.on_finished(done)
    done.output_token_ids = [4]
    oracle.on_finished(done)  # a shorter run of the same prompt teaches nothing new
    done.output_token_ids = []
    oracle.acceptance = 1.0
    assert oracle.propose(done, 3) == [4, 5]


def test_adaptive_k_backs_off_by_batch_and_acceptance() -> None:
    ak = AdaptiveK(SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=32, probe_interval=4))
    assert [ak.batch_k(n) for n in (1, 15, 16, 31, 32, 64)] == [4, 4, 2, 2, 0, 0]
    assert ak.request_k("a", 4) == 4
    for _ in range(5):
        ak.observe("a", 4, 0)
    assert [ak.request_k("a", 4) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]  # one-token probes
    ak.observe("a", 1, 1)
    ak.observe("a", 4, 4)
    assert ak.request_k("a", 4) == 4  # won back
    assert ak.prior < 1.0 and ak.request_k("new", 4) == 4  # a new request starts from the engine's average
    off = AdaptiveK(SpeculativeConfig(adaptive=False))
    off.observe("a", 4, 0)
    assert off.batch_k(1000) == 4 and off.request_k("a", 4) == 4
