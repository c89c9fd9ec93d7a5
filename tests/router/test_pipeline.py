"""The routing pipeline end to end over plugins: profiles, exclusions, P/D decisions. Table-driven."""

from __future__ import annotations

import pytest
from router_builders import ctx, deps, hasher, pod

from pdserve.engine.core.kv_events import BlockStored
from pdserve.services.router.pipeline import NoPodAvailable, RoutingPipeline
from pdserve.services.router.plugins import default_registry
from pdserve.services.router.routing_config import parse_routing_spec, preset

SPEC = {
    "decode": {"scorers": [{"type": "prefix-cache", "weight": 3}, {"type": "load", "weight": 1, "saturation": 4}]},
    "prefill": {"scorers": [{"type": "load", "weight": 1, "saturation": 4}]},
    "pd_decider": {"type": "prefix-aware", "min_prompt_tokens": 16, "max_cached_fraction": 0.75},
}


def pipeline(spec=None, d=None):
    d = d or deps()
    return RoutingPipeline(parse_routing_spec(spec or SPEC), default_registry(), d), d


def cache(d, pod_name, n_tokens):
    hashes = hasher().hash_prefix(list(range(1, n_tokens + 1)))
    d.prefix.on_event(pod_name, BlockStored(tuple(hashes), None, (), 4))


CASES = [
    # (id, cached {pod: tokens}, decode pods, prefill pods, prompt tokens, excluded, expected (decode, prefill, why))
    ("prefix-wins", {"d2": 24}, [pod("d1", live=True), pod("d2", live=True)], [pod("p1", waiting=0)], 32, (),
     ("d2", None, "cached-on-decode")),
    ("prefix-beats-light-load", {"d2": 24}, [pod("d1", waiting=0, live=True), pod("d2", waiting=2, live=True)],
     [pod("p1")], 32, (), ("d2", None, "cached-on-decode")),
    ("heavy-load-beats-prefix", {"d2": 8}, [pod("d1", waiting=0, live=True), pod("d2", waiting=9, live=True)],
     [pod("p1")], 32, (), ("d1", "p1", "remote-prefill")),
    ("short-prompt-decode-only", {}, [pod("d1", waiting=0), pod("d2", waiting=3)], [pod("p1")], 8, (),
     ("d1", None, "short-prompt")),
    ("remote-prefill-least-loaded", {}, [pod("d1", waiting=0)], [pod("p1", waiting=3), pod("p2", waiting=1)], 32,
     (), ("d1", "p2", "remote-prefill")),
    ("excluded-decode-skipped", {"d2": 32}, [pod("d1", live=True), pod("d2", live=True)], [pod("p1")], 32, {"d2"},
     ("d1", "p1", "remote-prefill")),
    ("no-prefill-pods", {}, [pod("d1")], [], 32, (), ("d1", None, "no-prefill-pods")),
    ("prefill-all-excluded", {}, [pod("d1")], [pod("p1")], 32, {"p1"}, ("d1", None, "no-prefill-available")),
    ("monolithic-decodes-alone", {}, [pod("m1", "both")], [pod("p1", "prefill")], 32, (),
     ("m1", None, "monolithic")),
]


@pytest.mark.parametrize("cached,decode_pods,prefill_pods,n,excluded,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_route(cached, decode_pods, prefill_pods, n, excluded, expected):
    p, d = pipeline()
    for name, tokens in cached.items():
        cache(d, name, tokens)
    decision = p.route(ctx(n, excluded=set(excluded)), decode_pods, prefill_pods)
    got = (decision.decode.name, decision.prefill.name if decision.prefill else None, decision.reason)
    assert got == expected


def test_no_decode_pod_left_raises():
    p, _ = pipeline()
    with pytest.raises(NoPodAvailable, match="no ready decode pod left to retry on"):
        p.route(ctx(8, excluded={"d1"}), [pod("d1")], [])
    with pytest.raises(NoPodAvailable, match="no ready decode pod"):
        p.route(ctx(8), [], [pod("p1")])


def test_filter_that_empties_the_list_is_named():
    spec = dict(SPEC, decode={"filters": [{"type": "queue-threshold", "max_waiting": 0, "strict": True}]})
    p, _ = pipeline(spec)
    with pytest.raises(NoPodAvailable, match="filter 'queue-threshold'"):
        p.route(ctx(8), [pod("d1", waiting=3)], [])


def test_round_robin_preset_alternates():
    p = RoutingPipeline(preset("round-robin"), default_registry(), deps())
    pods = [pod("d1"), pod("d2")]
    assert [p.route(ctx(4), pods, []).decode.name for _ in range(4)] == ["d1", "d2", "d1", "d2"]


def test_decisive_scorer_is_recorded():
    p, d = pipeline()
    cache(d, "d2", 24)
    c = ctx(32)
    p.route(c, [pod("d1", live=True), pod("d2", live=True)], [])
    assert ("decode", "prefix-cache") in c.attributes["decisive"]


CONFIG_ERRORS = [
    ("not-a-mapping", [], "must be a mapping"),
    ("unknown-top", {"decoder": {}}, "unknown keys"),
    ("unknown-profile-key", {"decode": {"scorer": []}}, "unknown keys"),
    ("weight-on-filter", {"decode": {"filters": [{"type": "role", "roles": ["decode"], "weight": 2}]}},
     "only scorers take a 'weight'"),
    ("negative-weight", {"decode": {"scorers": [{"type": "load", "weight": -1}]}}, "weight must be"),
    ("missing-type", {"decode": {"scorers": [{"weight": 1}]}}, "string 'type'"),
    ("bad-prefix-key", {"prefix": {"ttl": 3}}, "prefix: unknown keys"),
]


@pytest.mark.parametrize("raw,message", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_routing_spec(raw)


def test_unknown_plugin_in_config_fails_at_build():
    with pytest.raises(ValueError, match="unknown scorer 'prefix'"):
        pipeline({"decode": {"scorers": ["prefix"]}})


@pytest.mark.parametrize("name", ["prefix-load", "load", "round-robin", "random"])
def test_presets_build(name):
    RoutingPipeline(preset(name), default_registry(), deps())
