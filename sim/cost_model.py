"""The step-time cost model of the simulated engine, and the profile files it is read from.

A step of the real engine costs a fixed part (weights read once per step, kernel launches, sampling), a part per
token computed (the matmuls: prefill chunks and decodes alike) and a part per token of context attended to (the
KV reads of attention)::

    step_ms = base_ms + per_token_ms * num_batched_tokens + per_context_ms * total_context
              [+ prefill_base_ms when the step computes a prompt chunk]

The last term is the fixed cost a step with a prompt chunk pays on top: on a GPU such a step runs eagerly (CUDA
graphs capture pure-decode steps only), so its kernel launches are not amortized.

``total_context`` sums, over the step's chunks, the context each one attends to after the step (the engine's
``StepStat.total_context``). Three coefficients are fitted from three figures of ``docs/performance.md`` per model
and GPU (batch-1 decode, batch-64 decode at 1k context, a 4k prefill); each profile file says which, in its
``source`` field. Prefill attention is quadratic in the prompt, which the linear context term undercounts for
long prompts: at 4k tokens on an 8B model it is a few percent of the step, inside the fit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")


@dataclass(frozen=True)
class CostProfile:
    """One model on one GPU: step-time coefficients, KV size and the KV pool a pod of it holds."""

    name: str
    model: str
    gpu: str
    base_ms: float
    per_token_ms: float
    per_context_ms: float
    kv_bytes_per_token: int
    num_blocks: int
    block_size: int
    source: str = ""
    prefill_base_ms: float = 0.0  # extra fixed cost of a step with a prompt chunk (eager, not a CUDA graph)

    def __post_init__(self) -> None:
        for f in ("base_ms", "per_token_ms", "per_context_ms", "prefill_base_ms"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"profile {self.name!r}: {f} must be >= 0, got {getattr(self, f)!r}")
        for f in ("kv_bytes_per_token", "num_blocks", "block_size"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"profile {self.name!r}: {f} must be a positive integer, got {value!r}")

    def step_time_s(self, num_tokens: int, total_context: int, has_prefill: bool = False) -> float:
        """Seconds one engine step takes with ``num_tokens`` batched tokens attending ``total_context`` tokens
        (``has_prefill``: one of its chunks computes prompt tokens)."""
        if num_tokens <= 0:
            return 0.0
        fixed = self.base_ms + (self.prefill_base_ms if has_prefill else 0.0)
        return (fixed + self.per_token_ms * num_tokens + self.per_context_ms * total_context) / 1e3

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of KV cache that ``num_tokens`` tokens occupy (what a KV transfer moves)."""
        return self.kv_bytes_per_token * num_tokens


def available_profiles() -> list[str]:
    """Names of the profiles shipped with pdserve (``<model>_<gpu>``)."""
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


def load_profile(name_or_path: str) -> CostProfile:
    """A shipped profile by name (``llama-3.1-8b_h100``) or a JSON file by path; ``ValueError`` if neither."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(PROFILE_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path):
            raise ValueError(f"unknown cost profile {name_or_path!r}: not a file, and not one of "
                             f"{', '.join(available_profiles())}")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    known = {f.name for f in fields(CostProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"cost profile {path}: unknown fields {unknown}")
    try:
        return CostProfile(**data)
    except TypeError as exc:
        raise ValueError(f"cost profile {path}: {exc}") from None
