"""The routing configuration: which plugins each profile runs, with which weights and parameters.

A file (YAML or JSON, ``--routing-config``) or a named preset (``--routing-preset``). Example::

    decode:                       # picks the pod that decodes (and, for decode-only requests, prefills)
      filters: [{type: queue-threshold, max_waiting: 64}]
      scorers:
        - {type: prefix-cache, weight: 3}
        - {type: load, weight: 1, saturation: 16}
        - {type: session-affinity, weight: 1}
      picker: {type: max-score}
    prefill:                      # picks the prefill pod when the P/D decider asks for remote prefill
      scorers: [{type: prefix-cache, weight: 2}, {type: load, weight: 1}]
      picker: {type: max-score}
    pd_decider: {type: prefix-aware, min_prompt_tokens: 256, max_cached_fraction: 0.8}
    prefix: {pending_ttl_s: 10, approx_ttl_s: 600, approx_capacity_blocks: 65536}

Every key other than ``type`` (and ``weight`` for scorers) is passed to the plugin's factory. Unknown keys fail
when the router starts, with the plugin named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_PROFILE_KEYS = {"filters", "scorers", "picker"}
_TOP_KEYS = {"decode", "prefill", "pd_decider", "prefix"}
_PREFIX_KEYS = {"pending_ttl_s", "approx_ttl_s", "approx_capacity_blocks"}


@dataclass(frozen=True)
class PluginSpec:
    type: str
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # scorers only


@dataclass(frozen=True)
class ProfileSpec:
    filters: tuple[PluginSpec, ...] = ()
    scorers: tuple[PluginSpec, ...] = ()
    picker: PluginSpec = PluginSpec("max-score")


@dataclass(frozen=True)
class PrefixSpec:
    pending_ttl_s: float = 10.0
    approx_ttl_s: float = 600.0
    approx_capacity_blocks: int = 65536


@dataclass(frozen=True)
class RoutingSpec:
    decode: ProfileSpec
    prefill: ProfileSpec
    pd_decider: PluginSpec = PluginSpec("prefix-aware")
    prefix: PrefixSpec = PrefixSpec()


def _plugin(raw: Any, where: str, scorer: bool = False) -> PluginSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ValueError(f"{where}: expected a mapping with a string 'type', got {raw!r}")
    params = {k: v for k, v in raw.items() if k not in ("type", "weight")}
    weight = raw.get("weight", 1.0)
    if "weight" in raw and not scorer:
        raise ValueError(f"{where}: only scorers take a 'weight'")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"{where}: weight must be a number >= 0, got {weight!r}")
    return PluginSpec(raw["type"], params, float(weight))


def _profile(raw: Any, where: str) -> ProfileSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {raw!r}")
    unknown = set(raw) - _PROFILE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(_PROFILE_KEYS)}")
    for key in ("filters", "scorers"):
        if not isinstance(raw.get(key, []), list):
            raise ValueError(f"{where}.{key}: expected a list")
    return ProfileSpec(
        filters=tuple(_plugin(f, f"{where}.filters[{i}]") for i, f in enumerate(raw.get("filters", []))),
        scorers=tuple(_plugin(s, f"{where}.scorers[{i}]", scorer=True) for i, s in enumerate(raw.get("scorers", []))),
        picker=_plugin(raw.get("picker", "max-score"), f"{where}.picker"),
    )


def parse_routing_spec(raw: Any) -> RoutingSpec:
    """Validate the structure of a routing config (plugin names and parameters are checked when built)."""
    if not isinstance(raw, dict):
        raise ValueError("the routing config must be a mapping")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ValueError(f"routing config: unknown keys {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    prefix_raw = raw.get("prefix") or {}
    bad = set(prefix_raw) - _PREFIX_KEYS if isinstance(prefix_raw, dict) else {"<not a mapping>"}
    if bad:
        raise ValueError(f"routing config: prefix: unknown keys {sorted(bad)}; expected {sorted(_PREFIX_KEYS)}")
    return RoutingSpec(decode=_profile(raw.get("decode"), "decode"), prefill=_profile(raw.get("prefill"), "prefill"),
                       pd_decider=_plugin(raw.get("pd_decider", "prefix-aware"), "pd_decider"),
                       prefix=PrefixSpec(**prefix_raw))


def load_routing_file(path: str) -> RoutingSpec:
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        raw = json.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text)
    try:
        return parse_routing_spec(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# Named configurations for flags and benchmarks. "prefix-load" is the default.
PRESETS: dict[str, dict[str, Any]] = {
    "prefix-load": {
        "decode": {"scorers": [{"type": "prefix-cache", "weight": 3}, {"type": "load", "weight": 1},
                               {"type": "session-affinity", "weight": 1}],
                   "filters": [{"type": "queue-threshold", "max_waiting": 64}]},
        "prefill": {"scorers": [{"type": "prefix-cache", "weight": 2}, {"type": "load", "weight": 1}]},
    },
    "load": {
        "decode": {"scorers": [{"type": "load", "weight": 1}, {"type": "kv-usage", "weight": 1}]},
        "prefill": {"scorers": [{"type": "load", "weight": 1}]},
    },
    "round-robin": {
        "decode": {"picker": "round-robin"},
        "prefill": {"picker": "round-robin"},
    },
    "random": {
        "decode": {"picker": "random"},
        "prefill": {"picker": "random"},
    },
}


def preset(name: str) -> RoutingSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown routing preset {name!r}; known: {', '.join(PRESETS)}")
    return parse_routing_spec(PRESETS[name])
