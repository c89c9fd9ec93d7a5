"""Request checks shared by every front door (offline engine, engine core, router), so the rules and the messages
are the same wherever a request is refused. Pure Python: the router imports this without torch.

One rule set in two halves: what needs no model (types, ranges within int64, counts) is checked when a
:class:`SamplingParams` is built; what needs the model (context length, vocabulary) is :func:`validate_prompt`,
run by the API front end, the router and again by the engine core before a request joins a batch.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.sampling_params import SamplingParams, is_valid_text


def tokenize_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a prompt given as text or as a list of token ids; ``ValueError`` for anything else."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        if not is_valid_text(prompt):
            raise ValueError("the prompt is not valid Unicode text (it holds a lone surrogate)")
        return list(tokenizer(prompt).input_ids)
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("a prompt must be a string or a list of token ids")
    return list(prompt)


def validate_prompt(token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """Raise ``ValueError`` if the prompt can never be served under this model's context and vocabulary."""
    n = len(token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= max_model_len:
        raise ValueError(f"the prompt has {n} tokens but the model's context is {max_model_len} tokens "
                         f"(at least one token must be left to generate)")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"stop_token_ids: {bad} is outside the vocabulary [0, {vocab_size})")
    for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise ValueError(f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                         f"model's context of {max_model_len} tokens")
