"""Scoring and logits controls through the official ``openai`` client against ``pdserve serve`` (bundled model):
echo + logprobs (prompt logprobs equal transformers'), ``max_tokens: 0``, token-id prompts, ``logit_bias``,
``best_of``, ``allowed_token_ids``, ``bad_words``, and the 400s that name the field."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from api_servers import MODEL

pytestmark = pytest.mark.timeout(600)

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def hf_logprobs(model_config, tokenizer):
    """transformers' float32 log-softmax over PROMPT (row i predicts token i + 1), and the prompt's ids."""
    from transformers import AutoModelForCausalLM

    ids = tokenizer(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_config.model.path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1), ids


def test_echo_scores_the_prompt_like_transformers(client, hf_logprobs, tokenizer) -> None:
    ref, ids = hf_logprobs
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i, value in enumerate(lp.token_logprobs[1:]):
        assert math.isclose(value, ref[i, ids[i + 1]].item(), abs_tol=1e-3)
        best = int(ref[i].argmax())
        assert lp.top_logprobs[i + 1] == pytest.approx({tokenizer.decode([best]): ref[i, best].item()}, abs=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    # Token-id prompts (a batch, as lm-evaluation-harness sends them), one generated token after the prompt.
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=0,
                                      temperature=0)
    first, second = sorted(batch.choices, key=lambda c: c.index)
    assert len(first.logprobs.tokens) == len(ids) + 1 and len(second.logprobs.tokens) == 4
    assert first.logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert first.text.startswith(PROMPT) and first.logprobs.text_offset[-1] == len(PROMPT)
    assert batch.usage.completion_tokens == 2

    # vLLM's prompt_logprobs field, and the same in a stream.
    raw = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 0})
    plp = raw.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    assert plp[1][str(ids[1])]["logprob"] == pytest.approx(ref[0, ids[1]].item(), abs=1e-3)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True, logprobs=0,
                                            stream=True, temperature=0))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.token_logprobs]
    assert streamed[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-4) and len(streamed) == len(ids) + 2
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert offsets == sorted(offsets) and offsets[len(ids)] == len(PROMPT)


def test_logit_bias_moves_the_answer(client, tokenizer) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    forced_id = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                       logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == tokenizer.decode([forced_id] * 3)
    greedy_first = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0,
                                       logit_bias={str(greedy_first): -100})
    assert banned.choices[0].logprobs.tokens[0] != tokenizer.decode([greedy_first])
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0, logit_bias={str(forced_id): 100})
    assert chat.choices[0].message.content == tokenizer.decode([forced_id] * 2)


def test_best_of_returns_the_most_likely_candidate(client) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=1.0, seed=11)
    # n=4 and best_of=4 draw the same four candidates (each sequence is seeded seed + its index).
    all4 = client.completions.create(n=4, logprobs=0, **kwargs)
    sums = {c.text: sum(c.logprobs.token_logprobs) for c in all4.choices}
    assert len(sums) > 1, "the candidates should differ"
    best = client.completions.create(n=2, best_of=4, **kwargs)
    ranked = sorted(sums, key=sums.get, reverse=True)
    assert [c.text for c in sorted(best.choices, key=lambda c: c.index)] == ranked[:2]
    assert best.choices[0].logprobs is None  # not asked for
    assert best.usage.completion_tokens == all4.usage.completion_tokens  # every candidate's tokens count


def test_allowed_token_ids_and_bad_words(client, tokenizer) -> None:
    allowed = tokenizer.encode(" yes no maybe", add_special_tokens=False)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                                    extra_body={"allowed_token_ids": allowed})
    assert {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize(out.choices[0].text)} <= set(allowed)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert "Paris" in plain.choices[0].text
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"bad_words": ["Paris"]})
    assert "Paris" not in out.choices[0].text


@pytest.mark.parametrize("body, param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={"abc": 1}), "logit_bias"),
    (dict(logit_bias={"99999999": 1}), "logit_bias"),
    (dict(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
    (dict(n=2, best_of=1), "best_of"),
    (dict(best_of=17), "best_of"),
    (dict(best_of=2, stream=True), "best_of"),
    (dict(extra_body={"allowed_token_ids": [10 ** 9]}), "allowed_token_ids"),
    (dict(extra_body={"bad_words": [" "]}), "bad_words"),
    (dict(extra_body={"prompt_logprobs": 21}), "prompt_logprobs"),
])
def test_bad_requests_name_the_field(client, body, param) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", **{"max_tokens": 2, **body})
    assert err.value.status_code == 400 and err.value.param == param, err.value.body


def test_chat_refuses_best_of(client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"best_of": 3})
    assert err.value.param == "best_of"
