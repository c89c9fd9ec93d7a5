"""Table-driven tests of every built-in routing plugin: one row per case, exact expected outputs."""

from __future__ import annotations

import pytest
from router_builders import BLOCK, NOW, ctx, deps, hasher, pod

from pdserve.engine.core.kv_events import BlockStored
from pdserve.services.router.plugins import ScoredPod, default_registry


def build(kind: str, type_name: str, d=None, **params):
    return default_registry().create(kind, type_name, d or deps(), **params)


# ---------------------------------------------------------------------------------------------------- filters
FILTER_CASES = [
    # (id, filter type, params, pods, expected names kept)
    ("role-decode", "role", {"roles": ["decode"]},
     [pod("d", "decode"), pod("p", "prefill"), pod("b", "both")], ["d"]),
    ("role-many", "role", {"roles": ["decode", "both"]},
     [pod("d", "decode"), pod("p", "prefill"), pod("b", "both")], ["d", "b"]),
    ("role-string", "role", {"roles": "prefill"}, [pod("d"), pod("p", "prefill")], ["p"]),
    ("label-match", "label", {"match": {"zone": "a"}},
     [pod("x", labels={"zone": "a"}), pod("y", labels={"zone": "b"}), pod("z")], ["x"]),
    ("queue-drops-long", "queue-threshold", {"max_waiting": 2},
     [pod("a", waiting=0), pod("b", waiting=3), pod("c", waiting=2)], ["a", "c"]),
    ("queue-no-report-kept", "queue-threshold", {"max_waiting": 0}, [pod("a"), pod("b", waiting=1)], ["a"]),
    ("queue-soft-all-over", "queue-threshold", {"max_waiting": 1},
     [pod("a", waiting=5), pod("b", waiting=7)], ["a", "b"]),
    ("queue-strict-all-over", "queue-threshold", {"max_waiting": 1, "strict": True},
     [pod("a", waiting=5), pod("b", waiting=7)], []),
    ("kv-drops-full", "kv-usage-threshold", {"max_usage": 0.9},
     [pod("a", waiting=0, kv=0.95), pod("b", waiting=0, kv=0.5)], ["b"]),
    ("kv-soft-all-full", "kv-usage-threshold", {"max_usage": 0.5},
     [pod("a", waiting=0, kv=0.95), pod("b", waiting=0, kv=0.6)], ["a", "b"]),
]


@pytest.mark.parametrize("type_name,params,pods,expected", [c[1:] for c in FILTER_CASES],
                         ids=[c[0] for c in FILTER_CASES])
def test_filters(type_name, params, pods, expected):
    f = build("filter", type_name, **params)
    assert [p.name for p in f.filter(ctx(8), pods)] == expected


# ---------------------------------------------------------------------------------------------------- scorers
def _stored(tokens: list[int]) -> BlockStored:
    hashes = hasher().hash_prefix(tokens)
    return BlockStored(tuple(hashes), None, tuple(tokens[:len(hashes) * BLOCK]), BLOCK)


def _deps_with_cache(exact: dict[str, int], sent: dict[str, tuple[int, float]]):
    """``exact``: pod -> leading tokens its engine reported stored; ``sent``: pod -> (tokens, seconds ago)."""
    d = deps()
    for name, n in exact.items():
        d.prefix.on_event(name, _stored(list(range(1, n + 1))))
    for name, (n, ago) in sent.items():
        d.prefix.on_routed(name, hasher().hash_prefix(list(range(1, n + 1))), NOW - ago)
    return d


SCORER_CASES = [
    # (id, scorer type, params, deps factory, context, pods, expected scores)
    ("prefix-exact", "prefix-cache", {}, lambda: _deps_with_cache({"a": 8, "b": 4}, {}), ctx(16),
     [pod("a", live=True), pod("b", live=True), pod("c", live=True)], {"a": 0.5, "b": 0.25, "c": 0.0}),
    ("prefix-partial-block-ignored", "prefix-cache", {}, lambda: _deps_with_cache({"a": 7}, {}), ctx(16),
     [pod("a", live=True)], {"a": 0.25}),
    ("prefix-full-hit", "prefix-cache", {}, lambda: _deps_with_cache({"a": 20}, {}), ctx(16),
     [pod("a", live=True)], {"a": 1.0}),
    ("prefix-no-full-block", "prefix-cache", {}, lambda: _deps_with_cache({"a": 20}, {}), ctx(3),
     [pod("a", live=True)], {"a": 0.0}),
    # Without live events the approximate index answers; recent sends count, stale ones (> 600 s) do not.
    ("prefix-approx-fallback", "prefix-cache", {}, lambda: _deps_with_cache({}, {"a": (16, 5), "b": (16, 700)}),
     ctx(16), [pod("a"), pod("b")], {"a": 1.0, "b": 0.0}),
    # Exact events are ignored for a pod whose stream is not live (they may be stale).
    ("prefix-dead-stream-ignores-exact", "prefix-cache", {}, lambda: _deps_with_cache({"a": 16}, {}), ctx(16),
     [pod("a", live=False)], {"a": 0.0}),
    # Live pod: a send in the last 10 s counts before its BlockStored event arrives; an older one does not.
    ("prefix-live-pending", "prefix-cache", {}, lambda: _deps_with_cache({}, {"a": (8, 2), "b": (8, 30)}), ctx(16),
     [pod("a", live=True), pod("b", live=True)], {"a": 0.5, "b": 0.0}),
    ("load-absolute", "load", {"saturation": 4}, deps, ctx(4),
     [pod("a", waiting=0), pod("b", waiting=1, running=1), pod("c", waiting=9)], {"a": 1.0, "b": 0.5, "c": 0.0}),
    ("load-in-flight-fresher", "load", {"saturation": 4}, deps, ctx(4),
     [pod("a", waiting=0, in_flight=3), pod("b")], {"a": 0.25, "b": 1.0}),
    ("queue-min-max", "queue", {}, deps, ctx(4),
     [pod("a", waiting=2), pod("b", waiting=4), pod("c", waiting=6)], {"a": 1.0, "b": 0.5, "c": 0.0}),
    ("queue-all-equal", "queue", {}, deps, ctx(4), [pod("a", waiting=3), pod("b", waiting=3)], {"a": 1.0, "b": 1.0}),
    ("kv-usage", "kv-usage", {}, deps, ctx(4), [pod("a", waiting=0, kv=0.25), pod("b")], {"a": 0.75, "b": 0.5}),
    ("session-hit", "session-affinity", {}, lambda: _with_session("s1", "b"), ctx(4, session="s1"),
     [pod("a"), pod("b")], {"a": 0.0, "b": 1.0}),
    ("session-unknown", "session-affinity", {}, lambda: _with_session("s1", "b"), ctx(4, session="s2"),
     [pod("a"), pod("b")], {"a": 0.0, "b": 0.0}),
    ("session-none", "session-affinity", {}, lambda: _with_session("s1", "b"), ctx(4),
     [pod("a"), pod("b")], {"a": 0.0, "b": 0.0}),
]


def _with_session(key: str, pod_name: str):
    d = deps()
    d.sessions.set(key, pod_name, NOW)
    return d


@pytest.mark.parametrize("type_name,params,make_deps,context,pods,expected", [c[1:] for c in SCORER_CASES],
                         ids=[c[0] for c in SCORER_CASES])
def test_scorers(type_name, params, make_deps, context, pods, expected):
    scorer = build("scorer", type_name, make_deps(), **params)
    scores = scorer.score(context, pods)
    assert scores == pytest.approx(expected)
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_prefix_scorer_records_matched_blocks_for_the_decider():
    c = ctx(16)
    build("scorer", "prefix-cache", _deps_with_cache({"a": 8}, {})).score(c, [pod("a", live=True), pod("b", live=True)])
    assert c.matched_blocks == {"a": 2, "b": 0}
    assert c.cached_tokens_on("a") == 8


# ---------------------------------------------------------------------------------------------------- pickers
PICKER_CASES = [
    # (id, picker type, [(pod, score)], expected over successive picks)
    ("max-score", "max-score", [(pod("a"), 0.2), (pod("b"), 0.9), (pod("c"), 0.5)], ["b", "b"]),
    ("max-score-tie-fewest-in-flight", "max-score", [(pod("a", in_flight=2), 0.5), (pod("b", in_flight=1), 0.5)],
     ["b", "b"]),
    ("round-robin-name-order", "round-robin", [(pod("c"), 1.0), (pod("a"), 0.0), (pod("b"), 0.5)],
     ["a", "b", "c", "a"]),
    ("random-zero-weight-never", "random", [(pod("a"), 0.0), (pod("b"), 1.0)], ["b"] * 5),
]


@pytest.mark.parametrize("type_name,scored,expected", [c[1:] for c in PICKER_CASES],
                         ids=[c[0] for c in PICKER_CASES])
def test_pickers(type_name, scored, expected):
    picker = build("picker", type_name)
    candidates = [ScoredPod(p, s) for p, s in scored]
    assert [picker.pick(ctx(4), candidates).name for _ in expected] == expected


def test_max_score_random_tie_break_spreads():
    picker = build("picker", "max-score")
    candidates = [ScoredPod(pod("a"), 1.0), ScoredPod(pod("b"), 1.0)]
    assert {picker.pick(ctx(4), candidates).name for _ in range(50)} == {"a", "b"}


# ---------------------------------------------------------------------------------------------------- deciders
def _ctx_cached(n_tokens: int, cached_blocks: int):
    c = ctx(n_tokens)
    c.matched_blocks["d"] = cached_blocks
    return c


DECIDER_CASES = [
    # (id, decider, params, context, expected remote prefill, expected reason)
    ("short-prompt", "prefix-aware", {"min_prompt_tokens": 64}, _ctx_cached(40, 0), False, "short-prompt"),
    ("long-uncached", "prefix-aware", {"min_prompt_tokens": 64}, _ctx_cached(100, 0), True, "remote-prefill"),
    ("long-mostly-cached", "prefix-aware", {"min_prompt_tokens": 64, "max_cached_fraction": 0.8},
     _ctx_cached(100, 20), False, "cached-on-decode"),
    ("long-partly-cached", "prefix-aware", {"min_prompt_tokens": 64, "max_cached_fraction": 0.8},
     _ctx_cached(100, 19), True, "remote-prefill"),
    ("boundary-exact-min", "prefix-aware", {"min_prompt_tokens": 64}, _ctx_cached(64, 0), True, "remote-prefill"),
    ("always", "always", {}, _ctx_cached(4, 1), True, "always"),
    ("never", "never", {}, _ctx_cached(1000, 0), False, "never"),
]


@pytest.mark.parametrize("type_name,params,context,remote,reason", [c[1:] for c in DECIDER_CASES],
                         ids=[c[0] for c in DECIDER_CASES])
def test_deciders(type_name, params, context, remote, reason):
    verdict = build("pd-decider", type_name, **params).decide(context, pod("d"))
    assert (verdict.remote_prefill, verdict.reason) == (remote, reason)


# ---------------------------------------------------------------------------------------------------- registry
REGISTRY_ERRORS = [
    ("unknown-scorer", "scorer", "nope", {}, "unknown scorer 'nope'"),
    ("unknown-kind", "router", "x", {}, "unknown plugin kind"),
    ("bad-param", "scorer", "load", {"bogus": 1}, "bad parameters for scorer 'load'"),
    ("bad-value", "scorer", "load", {"saturation": 0}, "saturation must be positive"),
    ("bad-role", "filter", "role", {"roles": ["chef"]}, "bad parameters for filter 'role'"),
    ("bad-fraction", "pd-decider", "prefix-aware", {"max_cached_fraction": 2}, "max_cached_fraction"),
]


@pytest.mark.parametrize("kind,type_name,params,message", [c[1:] for c in REGISTRY_ERRORS],
                         ids=[c[0] for c in REGISTRY_ERRORS])
def test_registry_errors(kind, type_name, params, message):
    with pytest.raises(ValueError, match=message):
        build(kind, type_name, **params)


def test_registry_rejects_duplicates_and_lists_names():
    registry = default_registry()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("scorer", "load", lambda deps: None)
    assert registry.names("picker") == ["max-score", "random", "round-robin"]
