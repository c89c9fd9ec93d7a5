"""Sampler: exact results on hand-made logits."""

from __future__ import annotations

import math

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams


def req(rid: str, prompt=(1, 2), out=(), eos=None, **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), eos_token_id=eos)
    r.output_token_ids = list(out)
    return r


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_is_argmax() -> None:
    s = Sampler()
    res = s.sample(logits([0.1, 3.0, 0.2, 1.0], [5.0, 0.0, 0.0, 0.0]),
                   [req("a", temperature=0), req("b", temperature=0)])
    assert res.token_ids == [1, 0]
    assert res.logprobs is None


def test_repetition_penalty_follows_transformers() -> None:
    # token 1 (seen in the prompt) at 3.0 / 2 = 1.5 loses to token 3 at 2.0
    res = Sampler().sample(logits([0.0, 3.0, 0.0, 2.0]), [req("a", prompt=[1], temperature=0, repetition_penalty=2.0)])
    assert res.token_ids == [3]


def test_frequency_and_presence_penalties() -> None:
    # token 0 generated twice: 4.0 - 2*1.0 - 0.5 = 1.5 < 2.0
    r = req("a", out=[0, 0], temperature=0, frequency_penalty=1.0, presence_penalty=0.5)
    assert Sampler().sample(logits([4.0, 2.0, 0.0]), [r]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    r = req("a", eos=0, temperature=0, min_tokens=2, stop_token_ids=[1])
    assert Sampler().sample(logits([9.0, 8.0, 1.0]), [r]).token_ids == [2]
    r.output_token_ids = [2, 2]  # min_tokens reached: EOS allowed again
    assert Sampler().sample(logits([9.0, 8.0, 1.0]), [r]).token_ids == [0]


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    rows = logits([0.0, 1.0, 5.0, 4.9], [2.0, 0.0, 0.0, 1.9])
    for _ in range(20):
        res = Sampler().sample(rows, [req("a", temperature=1.0, top_k=1), req("b", temperature=1.0, top_p=0.01)])
        assert res.token_ids == [2, 0]


def test_min_p_removes_unlikely_tokens() -> None:
    # p(2) = e^5 / (e^5 + e^4.9 + ...) ~ 0.5; min_p 0.5 keeps tokens with p >= 0.25: {2, 3}
    rows = logits([0.0, 1.0, 5.0, 4.9])
    seen = {Sampler().sample(rows, [req("a", temperature=1.0, min_p=0.5)]).token_ids[0] for _ in range(60)}
    assert seen == {2, 3}


def test_seed_makes_sampling_repeatable() -> None:
    rows = torch.zeros(1, 50)
    def draw(seed: int) -> list[int]:
        s, r = Sampler(), req("a", temperature=1.0, seed=seed)
        s.add_request(r)
        return [s.sample(rows, [r]).token_ids[0] for _ in range(8)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_logprobs_of_sampled_and_top_tokens() -> None:
    row = [2.0, 0.0, 1.0]
    res = Sampler().sample(logits(row), [req("a", temperature=0, logprobs=2)])
    lse = math.log(sum(math.exp(v) for v in row))
    (chosen, top1, top2), = res.logprobs
    assert (chosen.token_id, chosen.rank) == (0, 1)
    assert math.isclose(chosen.logprob, 2.0 - lse, rel_tol=1e-6)
    assert [top1.token_id, top2.token_id] == [0, 2]
    assert math.isclose(top2.logprob, 1.0 - lse, rel_tol=1e-6)
