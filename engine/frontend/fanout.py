"""Request fan-out: how one client request becomes the ``n`` sequences the core (or the router) serves.

Written once here and used by the offline engine, ``AsyncLLM`` and the router, so every front door gives the
same sequences the same ids, seeds and token budgets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pdserve.engine.sampling_params import INT64_MAX, INT64_MIN, SamplingParams


def eos_token_id_of(tokenizer: Any, hf_config: Any) -> int | None:
    """The id that ends generation: the tokenizer's EOS, else the model config's."""
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


def child_ids(request_id: str, n: int) -> list[str]:
    """Core-side ids of the ``n`` sequences of one request."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Each of ``n`` sequences gets its own seed (seed + index) so seeded ``n > 1`` differs yet repeats.

    The sum wraps around within int64, so a seed near the top of the range stays a valid seed (every wire
    format carries seeds as int64).
    """
    seed = params.seed
    if seed is not None and index:
        seed = (seed + index - INT64_MIN) % (INT64_MAX - INT64_MIN + 1) + INT64_MIN
    return dataclasses.replace(params, n=1, seed=seed)


def with_default_max_tokens(params: SamplingParams, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """``max_tokens=None`` ("until the context is full") made concrete for a prompt of this length."""
    if params.max_tokens is not None:
        return params
    return dataclasses.replace(params, max_tokens=max(1, max_model_len - num_prompt_tokens))


def after_tokens(params: SamplingParams, num_tokens: int) -> SamplingParams:
    """The parameters that continue a sequence after ``num_tokens`` of its tokens were generated elsewhere (a
    prefill pod's first token, a resumed stream): ``max_tokens`` and ``min_tokens`` shrink by that many, and a
    structured-output constraint, bad_words and the presence/frequency penalties learn that the prompt ends with
    that many tokens of the sequence's own output."""
    structured = params.structured_outputs
    return dataclasses.replace(params, max_tokens=params.max_tokens - num_tokens,
                               min_tokens=max(0, params.min_tokens - num_tokens),
                               num_generated_prompt_tokens=params.num_generated_prompt_tokens + num_tokens,
                               structured_outputs=structured.after_tokens(num_tokens) if structured else None)


def fan_out(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """The ``(sequence id, sequence params)`` of each of the request's ``n`` sequences, in index order."""
    return [(sid, child_params(params, i)) for i, sid in enumerate(child_ids(request_id, params.n))]
