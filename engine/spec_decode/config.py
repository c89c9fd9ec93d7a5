"""``SpeculativeConfig``: what ``--speculative-config`` (a JSON object, vLLM's shape) turns into.

Example: ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}``.
Unknown methods are refused by name with a clear error rather than accepted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model", "oracle", "eagle", "eagle3", "medusa")
NEEDS_MODEL = {"draft_model": "the draft model to load", "eagle": "the EAGLE head's checkpoint directory",
               "eagle3": "the EAGLE-3 head's checkpoint directory", "medusa": "the Medusa heads' checkpoint directory"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """How the engine speculates.

    ``num_speculative_tokens`` (k) is the most drafts a request gets per step. ``prompt_lookup_min/max``: the
    n-gram sizes the ``ngram`` proposer matches (the longest first). ``model``: the ``draft_model`` proposer's
    model (same vocabulary as the target; ``draft_load_format`` as ``--load-format``), with a KV cache of
    ``draft_kv_cache_gib``; for ``eagle``, ``eagle3`` and ``medusa`` the head checkpoint's directory (or a
    shipped head's name), the EAGLE head's own KV cache sized by ``draft_kv_cache_gib`` too. ``oracle_path``:
    a JSON file of earlier outputs the ``oracle`` proposer replays (benchmarks; it also replays what this engine
    produced before), and ``oracle_acceptance`` the share of each proposal it keeps correct (the rest is made
    wrong on purpose).
    ``oracle_forced`` (timing only): the verifier accepts exactly that share whatever the target computes, and the
    oracle keeps proposing after the output leaves its record. For bf16 benchmarks on random weights, whose logits
    are near ties, so a verify step's argmax parts from a plain decode step's and the record stops matching; the
    kernels, shapes and host work are those of real verification, but the outputs are not the target's own.

    Adaptive k: with ``adaptive`` on, a request whose recent acceptance (an exponential average) falls below
    ``min_acceptance`` stops proposing, except for a probe every ``probe_interval`` steps; a step with
    ``disable_by_batch_size`` or more running requests proposes nothing, and one with half that many proposes
    at most half of k.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None
    draft_load_format: str = "auto"
    draft_kv_cache_gib: float = 1.0
    oracle_path: str | None = None
    oracle_acceptance: float = 1.0
    oracle_forced: bool = False
    adaptive: bool = True
    min_acceptance: float = 0.2
    probe_interval: int = 16
    disable_by_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; supported: {', '.join(METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "probe_interval",
                     "disable_by_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) exceeds "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        for name in ("oracle_acceptance", "min_acceptance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"speculative_config.{name} must be a number in [0, 1], got {value!r}")
        if self.method in NEEDS_MODEL and not (isinstance(self.model, str) and self.model):
            raise ValueError(f'speculative method "{self.method}" needs "model": {NEEDS_MODEL[self.method]}')
        if self.draft_load_format not in ("auto", "dummy"):
            raise ValueError(f"speculative_config.draft_load_format must be auto or dummy, got "
                             f"{self.draft_load_format!r}")
        if (isinstance(self.draft_kv_cache_gib, bool) or not isinstance(self.draft_kv_cache_gib, (int, float))
                or self.draft_kv_cache_gib <= 0):
            raise ValueError(f"speculative_config.draft_kv_cache_gib must be a positive number, got "
                             f"{self.draft_kv_cache_gib!r}")
        if not isinstance(self.oracle_forced, bool):
            raise ValueError(f"speculative_config.oracle_forced must be true or false, got {self.oracle_forced!r}")
        if self.oracle_forced and self.method != "oracle":
            raise ValueError('speculative_config.oracle_forced is for the "oracle" method (benchmarks) only')
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be true or false, got {self.adaptive!r}")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From the flag's JSON text, a dict or a config; None stays None. Unknown keys are refused."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--speculative-config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("--speculative-config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        return cls(**value)
