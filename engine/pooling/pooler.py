"""Pooling of a sequence's final hidden states (after the model's final norm) into one vector.

* ``mean``: the average over every token of the sequence;
* ``last``: the last token's state (what decoder-only embedding models such as e5-mistral or Qwen3-Embedding use);
* ``cls``: the first token's state (BERT-style models; for a decoder-only model it sees only the first token).

The vector is then L2-normalized unless ``normalize`` is false, as OpenAI's and vLLM's embeddings are.
"""

from __future__ import annotations

import torch

POOLING_TYPES = ("mean", "last", "cls")


def pool(hidden: torch.Tensor, lengths: list[int], pooling_type: str, normalize: bool = True) -> torch.Tensor:
    """``hidden: [T, D]``, the flattened states of sequences of ``lengths`` (in order) -> float32 ``[N, D]``."""
    if pooling_type not in POOLING_TYPES:
        raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {pooling_type!r}")
    rows = []
    for seq in torch.split(hidden.float(), lengths):
        if pooling_type == "mean":
            rows.append(seq.mean(dim=0))
        elif pooling_type == "last":
            rows.append(seq[-1])
        else:
            rows.append(seq[0])
    pooled = torch.stack(rows)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled
