"""Bad input gets a clear error and leaves the engine usable with no blocks leaked."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return LLM(str(make_tiny_model("llama", tmp_path_factory.mktemp("m"), max_position_embeddings=128)))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"logprobs": 100}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_params(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    (list(range(3, 200)), "context"),
    ([5, 6, 10**9], "vocabulary"),
    ("not token ids for a model without tokenizer", "tokenizer"),
])
def test_bad_prompts_fail_cleanly(llm: LLM, prompt, message) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([[3, 4, 5], prompt], SamplingParams(max_tokens=4, temperature=0.0))
    stats = llm.engine.core.get_stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks, "a rejected batch must not hold blocks"
    # The engine still serves the next good request.
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 3


def test_max_tokens_beyond_context(llm: LLM) -> None:
    with pytest.raises(ValueError, match="context"):
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=1000))


@pytest.mark.parametrize("model, kwargs, message", [
    ("no-such-model", {}, "no-such-model"),
    ("/nonexistent/dir/for/pdserve", {}, "nonexistent"),
    ("no-such-preset", {"load_format": "dummy"}, "no-such-preset"),
])
def test_unknown_model_or_missing_dir(model, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(model, **kwargs)
