"""The verifier alone: greedy acceptance is exact, and rejection sampling emits tokens distributed as the target
(chi-square goodness of fit over many rows at once), for point-mass and real draft distributions, under
temperature and top-p as the sampler applies them."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec_decode.rejection import emitted_tokens, rejection_rows
from tests.engine.spec_decode.chi_square import goodness_of_fit

V = 6
N = 40_000  # verified proposals per test


def _verify(p0: torch.Tensor, p1: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None,
            seed: int = 0) -> list[list[int]]:
    """N proposals of one draft each (rows: check d1 against p0, then the bonus row p1)."""
    torch.manual_seed(seed)
    probs = torch.stack([p0, p1]).repeat(N, 1)  # [2N, V]
    draft_ids = torch.stack([drafts, torch.zeros_like(drafts)], dim=1).reshape(-1)
    is_bonus = torch.tensor([False, True]).repeat(N)
    draft_probs = None if q is None else torch.stack([q, torch.zeros(V)]).repeat(N, 1)
    accepted, emit = rejection_rows(probs, probs.argmax(1), draft_ids, is_bonus, torch.zeros(2 * N, dtype=torch.bool),
                                    torch.rand(2 * N), torch.empty(2 * N, V).exponential_(), draft_probs)
    return emitted_tokens([1] * N, [[d] for d in drafts.tolist()], accepted.tolist(), emit.tolist())


def _counts(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=V).double()


P0 = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])
P1 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1])


@pytest.mark.parametrize("draft", [1, 4, 5])  # likely, unlikely, impossible under p0
def test_point_mass_drafts_keep_the_target_distribution(draft: int) -> None:
    out = _verify(P0, P1, torch.full((N,), draft), None)
    assert goodness_of_fit(_counts([o[0] for o in out]), P0) > 1e-3
    # After an accepted draft the bonus token follows p1.
    bonus = [o[1] for o in out if len(o) == 2]
    assert len(bonus) == pytest.approx(N * float(P0[draft]), rel=0.05, abs=10)
    if bonus:
        assert goodness_of_fit(_counts(bonus), P1) > 1e-3


def test_sampled_drafts_with_their_distribution_keep_the_target_distribution() -> None:
    q = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.2, 0.2])  # mass where p0 has none, too little where it has much
    drafts = torch.multinomial(q, N, replacement=True, generator=torch.Generator().manual_seed(3))
    out = _verify(P0, P1, drafts, q)
    assert goodness_of_fit(_counts([o[0] for o in out]), P0) > 1e-3
    accepted = sum(len(o) == 2 for o in out) / N
    assert accepted == pytest.approx(float(torch.minimum(P0, q).sum()), abs=0.01)  # the optimal acceptance


def test_the_test_can_fail() -> None:
    """Accepting every draft (a broken verifier) is caught by the same check."""
    out = [[1]] * N
    assert goodness_of_fit(_counts([o[0] for o in out]), P0) < 1e-6


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.3, top_p=0.8),
                                    dict(temperature=1.0, top_k=3, min_p=0.1)])
def test_target_distribution_from_the_sampler(params: dict) -> None:
    """p is what the sampler itself samples from (temperature, top-k/p, min-p); drafts verified against it are
    emitted with that distribution, and the plain sampler agrees."""
    logits = torch.tensor([[1.0, 2.5, 2.0, 1.8, 0.5, -1.0]])
    request = Request("r", [1, 2], SamplingParams(**params))
    sampler = Sampler()
    p = sampler.target_probs(sampler.process_logits(logits, [request]), [request])[0]
    out = _verify(p, p, torch.full((N,), 1), None)
    assert goodness_of_fit(_counts([o[0] for o in out]), p) > 1e-3
    torch.manual_seed(1)
    plain = sampler.sample(logits.repeat(N, 1), [request] * N).token_ids
    assert goodness_of_fit(_counts(plain), p) > 1e-3


def test_greedy_rows_accept_exactly_the_argmax_prefix() -> None:
    argmax = torch.tensor([3, 7, 2, 9, 4, 4])  # request a: 3 drafts + bonus; request b: 1 draft + bonus
    drafts = [[3, 7, 5], [4]]
    draft_ids = torch.tensor([3, 7, 5, 0, 4, 0])
    is_bonus = torch.tensor([False, False, False, True, False, True])
    probs = torch.full((6, 10), 0.1)
    accepted, emit = rejection_rows(probs, argmax, draft_ids, is_bonus, torch.ones(6, dtype=torch.bool),
                                    torch.rand(6), torch.ones(6, 10))
    assert emitted_tokens([3, 1], drafts, accepted.tolist(), emit.tolist()) == [[3, 7, 2], [4, 4]]
