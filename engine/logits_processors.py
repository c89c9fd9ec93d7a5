"""Per-request logits edits: ``allowed_token_ids``, ``bad_words`` and ``logit_bias`` (OpenAI / vLLM semantics).

The sampler calls :func:`apply_logits_processors` only when a row of the batch sets one of them
(``SamplingParams.needs_logits_processing``), on its private copy of the logits, and only those rows are touched:
a batch without them pays nothing. Logprobs are still those of the unedited model, as for penalties.

* ``allowed_token_ids``: every other token is masked out.
* ``bad_words``: a word's token sequence is never completed: with its first ``len - 1`` tokens just generated, its
  last token is masked (a one-token word is always masked). Each word is tokenized as it is and with a leading
  space (the form it takes inside a text), as vLLM does.
* ``logit_bias``: the bias is added to the token's logit (+100 all but forces it, -100 all but bans it).
"""

from __future__ import annotations

from typing import Any

import torch

from pdserve.engine.request import Request


def tokenize_bad_words(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """The token sequences that ``words`` forbid: each word alone, and after a space when that gives other tokens
    of the same length (a word-initial form)."""
    sequences: list[list[int]] = []
    for word in words:
        bare = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if bare:
            sequences.append(bare)
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and spaced != bare and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            sequences.append(spaced)
    return sequences


def banned_tokens(sequences: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """The tokens that would complete one of ``sequences`` after ``output_token_ids``."""
    banned = []
    for seq in sequences:
        prefix = seq[:-1]
        if len(prefix) <= len(output_token_ids) and (not prefix or output_token_ids[-len(prefix):] == prefix):
            banned.append(seq[-1])
    return banned


def apply_logits_processors(x: torch.Tensor, requests: list[Request]) -> None:
    """Edit ``x`` ([S, V] float32, one row per request) in place for the rows whose parameters ask."""
    for i, req in enumerate(requests):
        params = req.sampling_params
        if not params.needs_logits_processing:
            continue
        row = x[i]
        if params.allowed_token_ids is not None:
            allowed = torch.tensor(params.allowed_token_ids, dtype=torch.long, device=x.device)
            kept = row.index_select(0, allowed)
            row.fill_(float("-inf"))
            row.index_copy_(0, allowed, kept)
        if req.bad_words_token_ids:
            banned = banned_tokens(req.bad_words_token_ids, req.generated_token_ids)
            if banned:
                row[torch.tensor(banned, dtype=torch.long, device=x.device)] = float("-inf")
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=x.device)
            bias = torch.tensor(list(params.logit_bias.values()), dtype=x.dtype, device=x.device)
            row.index_add_(0, ids, bias)
