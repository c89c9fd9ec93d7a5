"""Router metrics (``pdserve:router_*``): decisions by plugin, prefix hits, P/D decisions, retries, resumes, pods.

They live on the same registry as the router's serving metrics (TTFT, latencies... as the client sees them), so
one ``/metrics`` page shows both. No global registry: each router builds its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.services.router.types import RoutingContext, RoutingDecision

_RATIO = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class RouterMetrics:
    """Counters and gauges the router updates as it routes; render through the shared registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.decisive = Counter("pdserve:router_plugin_decisions", "Routing decisions a scorer decided "
                                "(it told the pods apart and ranked the chosen pod first).",
                                ["profile", "plugin"], registry=r)
        self.filtered = Counter("pdserve:router_filtered_pods", "Pods dropped by a filter.", ["profile", "plugin"],
                                registry=r)
        self.pd = Counter("pdserve:router_pd_decisions", "Prefill/decode decisions.", ["decision", "reason"],
                          registry=r)
        self.prompt_tokens = Counter("pdserve:router_prompt_tokens", "Prompt tokens routed (each attempt).",
                                     registry=r)
        self.prefix_hit_tokens = Counter("pdserve:router_prefix_hit_tokens", "Prompt tokens the chosen decode pod "
                                         "was believed to hold (prefix hit ratio = this / prompt tokens).",
                                         registry=r)
        self.prefix_hit_ratio = Histogram("pdserve:router_prefix_hit_ratio", "Per request: cached fraction of the "
                                          "prompt on the chosen decode pod.", buckets=_RATIO, registry=r)
        self.retries = Counter("pdserve:router_retries", "Attempts retried on another pod before the first token.",
                               ["stage"], registry=r)
        self.resumes = Counter("pdserve:router_resumes", "Streams resumed on another decode pod mid-way.",
                               registry=r)
        self.failures = Counter("pdserve:router_request_failures", "Sequences that failed after all retries.",
                                ["reason"], registry=r)
        self.pod_requests = Counter("pdserve:router_pod_requests", "Attempts sent to each pod.", ["pod"],
                                    registry=r)
        self.pod_in_flight_gauge = Gauge("pdserve:router_pod_in_flight", "Requests in flight per pod.", ["pod"],
                                   registry=r)
        self.pod_ready_gauge = Gauge("pdserve:router_pod_ready", "1 when the pod is in rotation.", ["pod", "role"],
                               registry=r)
        self.kv_events = Counter("pdserve:router_kv_events", "KV cache events received.", ["pod", "type"],
                                 registry=r)
        self.kv_event_gaps = Counter("pdserve:router_kv_event_gaps", "Lost KV event batches (sequence gaps).",
                                     ["pod"], registry=r)
        self._roles: dict[str, str] = {}

    def on_decision(self, ctx: RoutingContext, decision: RoutingDecision) -> None:
        for profile, plugin in ctx.attributes.pop("decisive", ()):
            self.decisive.labels(profile, plugin).inc()
        for profile, plugin, dropped in ctx.attributes.pop("filtered", ()):
            self.filtered.labels(profile, plugin).inc(dropped)
        self.pd.labels("remote-prefill" if decision.remote_prefill else "decode-only", decision.reason).inc()
        n = ctx.num_prompt_tokens
        cached = ctx.cached_tokens_on(decision.decode.name)
        self.prompt_tokens.inc(n)
        self.prefix_hit_tokens.inc(cached)
        if n:
            self.prefix_hit_ratio.observe(cached / n)

    def in_flight(self, pod: str, value: int) -> None:
        self.pod_in_flight_gauge.labels(pod).set(value)

    def pod_ready(self, pod: str, ready: bool, role: str | None = None) -> None:
        if role is not None:
            self._roles[pod] = role
        self.pod_ready_gauge.labels(pod, self._roles.get(pod, "")).set(1 if ready else 0)

    def pod_removed(self, pod: str) -> None:
        """Drop a departed pod's series so dashboards do not show ghosts."""
        for gauge, labels in ((self.pod_in_flight_gauge, (pod,)), (self.pod_requests, (pod,)),
                              (self.pod_ready_gauge, (pod, self._roles.pop(pod, "")))):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
