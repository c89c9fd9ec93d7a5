"""logit_bias, allowed_token_ids and bad_words in the engine (tiny random Llama, no tokenizer): they steer only the
rows that set them, and bad parameters are refused before they reach the engine."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.logits_processors import banned_tokens
from tests.helpers.tiny_models import make_tiny_model

PROMPTS = [[5, 17, 99, 250, 3], [44, 45, 46]]


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return LLM(make_tiny_model("llama", tmp_path_factory.mktemp("lp") / "m"))


def _greedy(llm: LLM, prompts, **extra) -> list[list[int]]:
    params = SamplingParams(max_tokens=6, temperature=0.0, **extra)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_logit_bias_forces_and_bans(llm) -> None:
    plain = _greedy(llm, PROMPTS)
    assert _greedy(llm, PROMPTS, logit_bias={"300": 100}) == [[300] * 6] * 2  # string keys, as OpenAI's JSON
    banned = _greedy(llm, PROMPTS[:1], logit_bias={plain[0][0]: -100})[0]
    assert banned[0] != plain[0][0]
    # Rows without parameters are untouched by a neighbour that has them.
    mixed = llm.generate(PROMPTS, [SamplingParams(max_tokens=6, temperature=0.0, logit_bias={300: 100}),
                                   SamplingParams(max_tokens=6, temperature=0.0)])
    assert mixed[1].outputs[0].token_ids == plain[1]


def test_allowed_token_ids(llm, tmp_path) -> None:
    allowed = [7, 70, 170, 270]
    expected = _greedy(llm, PROMPTS, allowed_token_ids=allowed)
    for ids in expected:
        assert set(ids) <= set(allowed)
    overlapped = LLM(llm.config.model.path, async_scheduling=True)  # steps overlap; the rows are still edited
    assert _greedy(overlapped, PROMPTS, allowed_token_ids=allowed, logit_bias={70: 3}) == \
        _greedy(llm, PROMPTS, allowed_token_ids=allowed, logit_bias={70: 3})
    sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.0, seed=3, allowed_token_ids=allowed))
    assert all(set(o.outputs[0].token_ids) <= set(allowed) for o in sampled)


def test_banned_tokens_follow_the_generated_prefix() -> None:
    words = [[9], [4, 5, 6], [7, 8]]
    assert banned_tokens(words, []) == [9]
    assert banned_tokens(words, [1, 4, 5]) == [9, 6]
    assert banned_tokens(words, [7]) == [9, 8]
    assert banned_tokens(words, [4, 6]) == [9]


def test_bad_parameters_are_refused(llm) -> None:
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={1: 100.5})
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={str(i): 1 for i in range(301)})
    with pytest.raises(ValueError, match="^allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="^bad_words"):
        SamplingParams(bad_words=[""])
    with pytest.raises(ValueError, match="logit_bias: token id 600 is outside the vocabulary"):
        llm.generate([[5]], SamplingParams(logit_bias={600: 1}))
    with pytest.raises(ValueError, match="allowed_token_ids: token id 512"):
        llm.generate([[5]], SamplingParams(allowed_token_ids=[1, 512]))
    with pytest.raises(ValueError, match="bad_words needs the model's tokenizer"):
        llm.generate([[5]], SamplingParams(bad_words=["x"]))


def test_a_continuation_counts_the_tokens_its_prompt_ends_with(llm) -> None:
    """After a P/D handover or a resume the engine gets prompt + the tokens already sent, with ``after_tokens``'
    params: presence/frequency penalties and bad_words must see those tokens as generated, so the continuation
    equals the rest of one uninterrupted run."""
    import torch

    from pdserve.engine.frontend import after_tokens
    from pdserve.engine.logits_processors import apply_logits_processors
    from pdserve.engine.request import Request

    params = SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=2.0, frequency_penalty=1.5)
    for prompt in PROMPTS:
        whole = llm.generate([prompt], params)[0].outputs[0].token_ids
        for sent in (1, 3):
            rest = llm.generate([prompt + whole[:sent]], after_tokens(params, sent))[0].outputs[0].token_ids
            assert rest == whole[sent:], (prompt, sent)
    # bad_words across the handover: the word's first token ended the prefill pod's output (the decode pod's
    # prompt), so its second token is masked in the decode pod's first row.
    word = SamplingParams(max_tokens=4, bad_words=["tokenized at admission: [[40, 41]]"])
    handed_over = Request("r", [5, 17, 40], after_tokens(word, 1))
    handed_over.bad_words_token_ids = [[40, 41]]
    fresh = Request("s", [5, 17, 40], word)
    fresh.bad_words_token_ids = [[40, 41]]
    logits = torch.zeros(2, 64)
    apply_logits_processors(logits, [handed_over, fresh])
    assert logits[0, 41] == float("-inf") and torch.isfinite(logits[1]).all()
    with pytest.raises(ValueError, match="num_generated_prompt_tokens"):
        llm.generate([[5]], after_tokens(SamplingParams(max_tokens=4), 1))
