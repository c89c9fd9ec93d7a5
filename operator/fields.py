"""Typed, path-naming access to one object of an InferenceService spec, and the error it raises.

Split from :mod:`pdserve.operator.spec` so that module holds only what a spec means; this one only how a field
is read: its type checked (a YAML ``true`` is no replica count), unknown keys refused, every error naming the
field's path.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping


class SpecError(ValueError):
    """An invalid spec. ``reason`` is a CamelCase word for conditions and Events; ``path`` names the field."""

    def __init__(self, path: str, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = reason


class Fields:
    """Typed access to one object of the spec that names the field in every error and refuses unknown keys."""

    def __init__(self, obj: Any, path: str, known: tuple[str, ...]) -> None:
        if obj is None:
            obj = {}
        if not isinstance(obj, Mapping):
            raise SpecError(path, "must be an object")
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise SpecError(path, f"unknown field(s) {', '.join(unknown)}")
        self.obj, self.path = obj, path

    def _get(self, key: str, types: tuple[type, ...], default: Any) -> Any:
        value = self.obj.get(key, default)
        # bool is an int subclass in Python; a YAML "true" must not pass as a replica count.
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            names = "/".join(t.__name__ for t in types)
            raise SpecError(f"{self.path}.{key}", f"must be {names}, got {value!r}")
        return value

    def int(self, key: str, default: int | None, minimum: int | None = None, maximum: int | None = None) -> Any:
        value = self._get(key, (int,), default)
        if value is not None and minimum is not None and value < minimum:
            raise SpecError(f"{self.path}.{key}", f"must be >= {minimum}, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise SpecError(f"{self.path}.{key}", f"must be <= {maximum}, got {value}")
        return value

    def number(self, key: str, default: float) -> float:
        return float(self._get(key, (int, float), default))

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, (bool,), default)

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(key, (str,), default)
        if value is not None and choices and value not in choices:
            raise SpecError(f"{self.path}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def sub(self, key: str, known: tuple[str, ...]) -> "Fields":
        return Fields(self.obj.get(key), f"{self.path}.{key}", known)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._get(key, (list,), [])
        if not all(isinstance(v, str) for v in value):
            raise SpecError(f"{self.path}.{key}", "must be a list of strings")
        return tuple(value)

    def data(self, key: str, kind: type) -> Any:
        """A pass-through Kubernetes structure (tolerations, affinity, env, ...), copied so callers own it."""
        return copy.deepcopy(self._get(key, (kind,), kind()))

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None
