"""What a request asks its output to obey: one JSON Schema, ``json_object``, a regex, a choice or a grammar.

Pure Python (no torch, no grammar backend): :class:`SamplingParams` carries this, the router imports it, and it
travels over every wire (msgpack to the engine core, protobuf to pods) as it is. The backend checks the spec
itself (:func:`pdserve.engine.structured_output.backend.check_spec`) where a request enters a server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

# Bounds that keep one request from asking for unbounded compile work (the backend's compile time grows with
# the size of the schema or grammar).
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    """Exactly one of the constraints is set (vLLM's ``structured_outputs`` object, the same field names).

    * ``json``: a JSON Schema (a dict, or its JSON text; kept as compact JSON text in its key order, which is the
      order properties are generated in; the compile cache's key);
    * ``json_object``: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``);
    * ``regex``: a regular expression the whole output matches;
    * ``choice``: the output is exactly one of these strings;
    * ``grammar``: an EBNF grammar (GBNF syntax, start rule ``root``).

    ``num_prefix_tokens``: the last that many *prompt* tokens were already generated under this constraint (a
    prefill pod's first token, a resumed stream): the engine advances the matcher over them before sampling.
    """

    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    num_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            try:
                self.json = json.dumps(self.json, separators=(",", ":"), ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"structured_outputs.json is no JSON value: {exc}") from None
        elif isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON Schema (an object)")
            self.json = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
        if self.choice is not None:
            self.choice = list(self.choice)
        self._validate()

    def _validate(self) -> None:
        set_kinds = [k for k in KINDS if self._value(k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(set_kinds) or 'none'}")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_SPEC_CHARS):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string of at most "
                                 f"{MAX_SPEC_CHARS} characters")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a boolean")
        if self.choice is not None:
            if not 1 <= len(self.choice) <= MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice must hold 1 to {MAX_CHOICES} strings")
            for c in self.choice:
                if not isinstance(c, str) or not c or len(c) > MAX_CHOICE_CHARS:
                    raise ValueError(f"each structured_outputs.choice must be a non-empty string of at most "
                                     f"{MAX_CHOICE_CHARS} characters, got {c!r}")
        n = self.num_prefix_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"structured_outputs.num_prefix_tokens must be an integer >= 0, got {n!r}")

    def _value(self, kind: str) -> Any:
        return getattr(self, kind)

    @property
    def kind(self) -> str:
        """Which constraint is set: one of :data:`KINDS`."""
        return next(k for k in KINDS if self._value(k) not in (None, False))

    def cache_key(self) -> tuple[str, str]:
        """What the compiled grammar depends on (``num_prefix_tokens`` does not change the grammar)."""
        kind = self.kind
        value = self._value(kind)
        if kind == "choice":
            value = json.dumps(value, ensure_ascii=False)
        return kind, "" if kind == "json_object" else str(value)

    def after_tokens(self, num_tokens: int) -> "StructuredOutputsParams":
        """The same constraint for a sequence that continues after ``num_tokens`` more generated tokens."""
        return replace(self, num_prefix_tokens=self.num_prefix_tokens + num_tokens)

    @classmethod
    def from_dict(cls, value: Any) -> "StructuredOutputsParams":
        """From the HTTP API's object (unknown keys refused, so a typo is no silent "unconstrained")."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, dict):
            raise ValueError("structured_outputs must be an object")
        unknown = sorted(set(value) - set(KINDS) - {"num_prefix_tokens"})
        if unknown:
            raise ValueError(f"structured_outputs: unknown or unsupported keys {unknown} "
                             f"(supported: {', '.join(KINDS)})")
        return cls(**value)
