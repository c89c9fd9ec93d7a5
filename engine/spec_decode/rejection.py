"""Verification of drafts against the target model: exact for greedy rows, distribution-preserving for sampled rows.

For one request with drafts ``d_1 .. d_k`` the target produced ``k + 1`` distributions ``p_0 .. p_k``
(row ``j`` predicts the token after ``d_j``; ``p_k`` is the "bonus" row after the last draft)::

    rows      p_0   p_1   ...  p_{k-1}  p_k
    checks    d_1   d_2   ...  d_k      (bonus)

Greedy rows accept ``d_{j+1}`` while it is the argmax of ``p_j``; the first mismatch emits that argmax instead.
Sampled rows use speculative rejection sampling: accept ``d_{j+1}`` with probability ``min(1, p_j(d)/q_j(d))``
(``q_j`` the draft distribution; a point mass for deterministic proposers, so simply ``p_j(d)``); at the first
rejection emit a sample of the residual ``max(0, p_j - q_j)`` renormalized; if all are accepted emit a sample of
``p_k``. Each emitted token is then distributed exactly as ``p_j`` (``q(x) min(1, p/q) + (1 - beta) r(x) = p(x)``),
whatever the proposer guessed, so sampling with speculation matches sampling without it.

The device half (:func:`rejection_rows`) decides every row at once, so a step needs one host copy; the host half
(:func:`emitted_tokens`) walks each request's rows to its first rejection.
"""

from __future__ import annotations

import torch


def rejection_rows(probs: torch.Tensor, argmax: torch.Tensor, draft_ids: torch.Tensor, is_bonus: torch.Tensor,
                   greedy: torch.Tensor, uniform: torch.Tensor, noise: torch.Tensor,
                   draft_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether its draft is accepted, and the token to emit if the walk stops there.

    Args:
        probs: ``[R, V]`` the target's distribution per row (after penalties, temperature, top-k/p, min-p).
        argmax: ``[R]`` the argmax of the processed logits (what a greedy row emits).
        draft_ids: ``[R]`` the draft each row checks (any valid id on bonus rows).
        is_bonus: ``[R]`` bool, the last row of each request (no draft to check).
        greedy: ``[R]`` bool, rows of greedy requests.
        uniform: ``[R]`` draws from U[0, 1) for the acceptance test.
        noise: ``[R, V]`` draws from Exp(1): ``argmax(dist / noise)`` samples ``dist``.
        draft_probs: ``[R, V]`` the proposer's distribution per row, or None for a point mass on the draft.

    Returns ``accepted [R]`` bool (False on bonus rows) and ``emit [R]`` int64.
    """
    col = draft_ids.unsqueeze(1)
    p_draft = probs.gather(1, col).squeeze(1)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
        residual = probs.scatter(1, col, 0.0)  # max(0, p - onehot(d)): d's mass removed
    else:
        q_draft = draft_probs.gather(1, col).squeeze(1)
        residual = (probs - draft_probs).clamp_min(0.0)
    # Bonus rows sample the target itself; an all-zero residual (p <= q everywhere, so p == q) is never reached
    # after a rejection, but keep its rows well defined.
    residual = torch.where(is_bonus.unsqueeze(1), probs, residual)
    mass = residual.sum(dim=1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), probs)
    sampled_accept = uniform * q_draft < p_draft
    accepted = torch.where(greedy, draft_ids == argmax, sampled_accept) & ~is_bonus
    emit = torch.where(greedy, argmax, (residual / noise).argmax(dim=1))
    return accepted, emit


def emitted_tokens(num_drafts: list[int], drafts: list[list[int]], accepted: list[bool],
                   emit: list[int]) -> list[list[int]]:
    """Each request's output for the step: its accepted drafts, then the token of the row where the walk
    stopped (the first rejected row, or the bonus row). Rows are laid out request by request, ``k + 1`` each."""
    out = []
    row = 0
    for k, ds in zip(num_drafts, drafts):
        n = 0
        while n < k and accepted[row + n]:
            n += 1
        out.append(ds[:n] + [emit[row + n]])
        row += k + 1
    return out
