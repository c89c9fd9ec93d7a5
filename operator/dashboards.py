"""The Grafana dashboards shipped in the chart, built from code so every query is written once.

Regenerate the chart's JSON files after a change with::

    python -m pdserve.operator.dashboards charts/pdserve/dashboards

A test fails when the files are stale, and another checks that every PromQL expression names only metrics the
code registers (and that :mod:`pdserve.operator.metrics_catalog` lists them).

Labels the queries rely on:

- ``role`` -- copied by the ServiceMonitors from each pod's ``pdserve.io/role`` label. Routers export the serving
  metrics too (latency as clients see it), so engine panels select ``role=~"prefill|decode"`` and client-facing
  panels ``role="router"``.
- ``exported_pod`` / ``exported_role`` -- the router's own ``pod`` and ``role`` labels (the engine pod a metric
  is about): Prometheus renames them because the scrape sets ``pod`` and ``role`` to the router's own.
- Router metrics have no ``model_name``; their panels filter by namespace only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
NS = 'namespace=~"$namespace"'
SEL = f'{NS}, model_name=~"$model"'
ENGINES = f'{SEL}, role=~"prefill|decode"'
CLIENTS = f'{SEL}, role="router"'
RATE = "$__rate_interval"


def quantiles(metric: str, sel: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)
              ) -> list[tuple[str, str]]:
    """(expr, legend) of histogram quantiles of ``metric``, optionally split by a label."""
    group = f"le, {by}" if by else "le"
    suffix = " " + " ".join(f"{{{{{b.strip()}}}}}" for b in by.split(",")) if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
             f"p{int(q * 100)}{suffix}") for q in qs]


def rate(metric: str, sel: str, by: str = "") -> tuple[str, str]:
    """(expr, legend) of a counter's per-second rate, summed (by a label, if given)."""
    if not by:
        return f"sum(rate({metric}{{{sel}}}[{RATE}]))", metric.split(":")[1].removesuffix("_total")
    legend = " ".join(f"{{{{{b.strip()}}}}}" for b in by.split(","))
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RATE}]))", legend


class Board:
    """Accumulates panels on a 24-column grid, two per row, with section rows in between."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[Obj] = []
        self.y = 0
        self.x = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []})
        self.y += 1

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str, description: str,
              kind: str = "timeseries", width: int = 12, stacked: bool = False, exemplars: bool = False) -> None:
        """``stacked``: series stacked (parts of a whole); ``exemplars``: show the trace ids the histograms carry
        (OpenMetrics scrapes), each linking to its trace."""
        if self.x + width > 24:
            self._newline()
        defaults: Obj = {"unit": unit}
        if stacked:
            defaults["custom"] = {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 60}
        self.panels.append({
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": self.x, "y": self.y, "w": width, "h": 8},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         **({"exemplar": True} if exemplars else {})}
                        for i, (expr, legend) in enumerate(targets)],
        })
        self.x += width

    def _newline(self) -> None:
        if self.x:
            self.y += 8
            self.x = 0

    def json(self) -> Obj:
        variable = {"type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "refresh": 2, "multi": True, "includeAll": True, "current": {"text": "All", "value": "$__all"}}
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["pdserve", "llm"], "timezone": "browser", "editable": True, "schemaVersion": 39,
            "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": [
                {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus"},
                {**variable, "name": "namespace", "label": "Namespace",
                 "query": "label_values(pdserve:num_requests_running, namespace)"},
                {**variable, "name": "model", "label": "Model",
                 "query": 'label_values(pdserve:num_requests_running{namespace=~"$namespace"}, model_name)'},
            ]},
            "panels": self.panels,
        }


def serving() -> Obj:
    b = Board("pdserve-serving", "pdserve / Serving",
              "Latency, throughput, queues, KV cache and prefill/decode replicas of pdserve InferenceServices.")
    b.row("Latency as clients see it (router)")
    b.panel("Time to first token", quantiles("pdserve:time_to_first_token_seconds", CLIENTS), "s",
            "From arrival at the router to the first token streamed back (remote prefill and KV hand-over included).")
    b.panel("Inter-token latency", quantiles("pdserve:inter_token_latency_seconds", CLIENTS), "s",
            "Gap between consecutive streamed tokens.")
    b.panel("Time per output token", quantiles("pdserve:time_per_output_token_seconds", CLIENTS), "s",
            "A request's decode time divided by the tokens generated after the first.")
    b.panel("End-to-end latency", quantiles("pdserve:e2e_request_latency_seconds", CLIENTS), "s",
            "From arrival at the router to the last token.")
    b.panel("Queue, prefill and decode time in the engines (p90)", [
        (quantiles(m, ENGINES, by="role", qs=(0.9,))[0][0], f"{label} {{{{role}}}}") for m, label in (
            ("pdserve:request_queue_time_seconds", "queue"), ("pdserve:request_prefill_time_seconds", "prefill"),
            ("pdserve:request_decode_time_seconds", "decode"))], "s",
        "Where a request's time goes inside prefill and decode pods.")
    b.row("Throughput")
    b.panel("Tokens per second", [
        (rate("pdserve:prompt_tokens_total", CLIENTS)[0], "prompt"),
        (rate("pdserve:generation_tokens_total", CLIENTS)[0], "generated")], "tok/s",
        "Prompt tokens received and tokens streamed back, at the routers.")
    b.panel("Finished requests per second", [rate("pdserve:request_success_total", CLIENTS, "finished_reason")],
            "reqps", "At the routers, by why they finished (stop, length, abort, error).")
    b.panel("Engine tokens per second", [rate("pdserve:prompt_tokens_total", ENGINES, "role"),
                                         rate("pdserve:generation_tokens_total", ENGINES, "role")], "tok/s",
            "Prompt tokens computed and tokens generated, by role.")
    b.panel("Tokens per scheduler step (p50, p90)",
            quantiles("pdserve:iteration_tokens_total", ENGINES, by="role", qs=(0.5, 0.9)), "short",
            "How full each engine step's token budget is.")
    b.row("Queues and KV cache")
    b.panel("Running requests", [(f"sum by (role) (pdserve:num_requests_running{{{ENGINES}}})", "{{role}}")],
            "short", "Requests in the engines' running batches, by role.")
    b.panel("Waiting requests (queue depth)",
            [(f"sum by (role) (pdserve:num_requests_waiting{{{ENGINES}}})", "{{role}}")], "short",
            "Requests waiting for a batch slot, by role.")
    b.panel("KV cache usage", [(f"max by (pod) (pdserve:kv_cache_usage_perc{{{ENGINES}}})", "{{pod}}")],
            "percentunit", "Share of each engine pod's KV cache blocks in use.")
    b.panel("Prefix cache hit rate", [
        (f"sum by (role) (rate(pdserve:prefix_cache_hits_total{{{ENGINES}}}[{RATE}])) / "
         f"sum by (role) (rate(pdserve:prefix_cache_queries_total{{{ENGINES}}}[{RATE}]))", "{{role}}")],
        "percentunit", "Prompt tokens found in the prefix cache, of the tokens looked up.")
    b.panel("Prompt tokens not computed", [rate("pdserve:prompt_tokens_cached_total", ENGINES, "role, source")],
            "tok/s", "Prompt tokens whose KV came from the prefix cache or, on decode pods, over the KV connector.")
    b.panel("Preemptions per second", [rate("pdserve:num_preemptions_total", ENGINES, "pod")], "ops",
            "Requests evicted to free KV cache; sustained preemption means too little KV memory.")
    b.row("Structured output")
    b.panel("Constrained requests and grammar compiles per second", [
        rate("pdserve:structured_output_requests_total", ENGINES, "role"),
        rate("pdserve:structured_output_compiles_total", ENGINES, "role"),
        rate("pdserve:structured_output_cache_hits_total", ENGINES, "role")], "ops",
        "Sequences with a JSON Schema, regex, choice or grammar constraint; compiles (cache misses); cache hits.")
    b.panel("Mean grammar compile time", [
        (f"sum by (role) (rate(pdserve:structured_output_compile_seconds_total{{{ENGINES}}}[{RATE}])) / "
         f"sum by (role) (rate(pdserve:structured_output_compiles_total{{{ENGINES}}}[{RATE}]))", "{{role}}")],
        "s", "Time to compile a grammar for the vocabulary, off the model loop (a cold schema's cost).")
    b.row("Speculative decoding")
    accepted = f"rate(pdserve:spec_decode_num_accepted_tokens_total{{{ENGINES}}}[{RATE}])"
    b.panel("Draft acceptance rate and mean acceptance length", [
        (f"sum by (pod) ({accepted}) / "
         f"sum by (pod) (rate(pdserve:spec_decode_num_draft_tokens_total{{{ENGINES}}}[{RATE}]))",
         "acceptance {{pod}}"),
        (f"1 + sum by (pod) ({accepted}) / "
         f"sum by (pod) (rate(pdserve:spec_decode_num_drafts_total{{{ENGINES}}}[{RATE}]))", "mean length {{pod}}")],
        "short", "Accepted draft tokens per draft token, and tokens emitted per verified proposal (1 + accepted "
                 "per proposal), by decode pod.")
    b.panel("Accepted draft tokens per second, by position", [
        rate("pdserve:spec_decode_num_accepted_tokens_per_pos_total", ENGINES, "position")], "ops",
        "Acceptance falls along the proposal: position 0 is accepted most often.")
    b.row("Replicas")
    b.panel("Output tokens requested vs generated", [
        rate("pdserve:requested_output_tokens_total", ENGINES, "role"),
        rate("pdserve:generation_tokens_total", ENGINES, "role")], "tok/s",
        "max_tokens of the requests arriving (counted once on arrival, on prefill and decode pods) against the tokens "
        "generated: the autoscaler sizes decode from the first, scaled by the share of max_tokens requests use.")
    b.panel("Share of max_tokens generated", [
        (f"sum by (role) (rate(pdserve:request_generation_tokens_sum{{{ENGINES}}}[{RATE}])) / "
         f"sum by (role) (rate(pdserve:request_params_max_tokens_sum{{{ENGINES}}}[{RATE}]))", "{{role}}")],
        "percentunit", "Tokens finished requests generated, of the max_tokens they asked for (the autoscaler's fill).")
    b.panel("KV cache capacity", [(f"sum by (role) (pdserve:kv_cache_capacity_tokens{{{ENGINES}}})", "{{role}}")],
            "short", "Tokens the engine pods' KV caches hold together, by role (what decode's sequences fill).")
    b.panel("Prefill and decode pods", [
        (f"count by (role) (pdserve:num_requests_running{{{ENGINES}}})", "{{role}}")],
        "short", "Engine pods reporting metrics, by role.")
    b.panel("P:D ratio", [(f'count(pdserve:num_requests_running{{{SEL}, role="prefill"}}) / '
                           f'count(pdserve:num_requests_running{{{SEL}, role="decode"}})', "prefill per decode")],
            "short", "Prefill pods per decode pod.", kind="stat")
    return b.json()


def kv_transfer() -> Obj:
    b = Board("pdserve-kv-transfer", "pdserve / KV transfer",
              "KV cache hand-over from prefill to decode pods, by connector (shared-fs, grpc, redis).")
    b.row("Volume")
    b.panel("Bytes per second", [rate("pdserve:kv_transfer_bytes_total", SEL, "connector, direction")], "Bps",
            "KV bytes saved by prefill pods and loaded by decode pods, by connector.")
    b.panel("Blocks per second", [rate("pdserve:kv_transfer_blocks_total", SEL, "connector, direction")], "ops",
            "KV blocks saved and loaded, by connector.")
    b.row("Latency and failures")
    b.panel("Transfer latency", quantiles("pdserve:kv_transfer_latency_seconds", SEL, by="connector, direction",
                                          qs=(0.5, 0.99)),
            "s", "Per request: saving its KV (prefill) or getting it in place (decode).")
    b.panel("Failures per second", [rate("pdserve:kv_transfer_failures_total", SEL, "connector, reason")], "ops",
            "Failed loads or saves (a decode pod then recomputes the prompt), by reason.")
    b.panel("Blocks held under lease", [(f"sum by (pod) (pdserve:kv_transfer_blocks_held{{{SEL}}})", "{{pod}}")],
            "short", "Blocks a prefill pod keeps until a decode pod has them.")
    return b.json()


def router() -> Obj:
    b = Board("pdserve-router", "pdserve / Router",
              "The router's choices: scorers, prefix hits, prefill/decode decisions, retries and resumes.")
    b.row("Decisions")
    b.panel("Decisions per second by plugin", [rate("pdserve:router_plugin_decisions_total", NS, "plugin")], "ops",
            "Routing decisions, by the scorer that told the pods apart.")
    b.panel("Requests per second by pod", [rate("pdserve:router_pod_requests_total", NS, "exported_pod")], "reqps",
            "Attempts sent to each engine pod.")
    b.panel("Remote prefill or decode only", [rate("pdserve:router_pd_decisions_total", NS, "decision")], "ops",
            "The P/D decider's choices.")
    b.panel("Prefix hit ratio", [
        *quantiles("pdserve:router_prefix_hit_ratio", NS, qs=(0.5, 0.9)),
        (f"sum(rate(pdserve:router_prefix_hit_tokens_total{{{NS}}}[{RATE}])) / "
         f"sum(rate(pdserve:router_prompt_tokens_total{{{NS}}}[{RATE}]))", "all tokens")],
        "percentunit", "Share of each prompt already cached on the chosen decode pod.")
    b.panel("Pods dropped by filters", [rate("pdserve:router_filtered_pods_total", NS, "plugin")], "ops",
            "Pods a filter (e.g. queue-threshold) took out of a decision.")
    b.row("Reliability")
    b.panel("Retries, resumes and failures per second", [
        rate("pdserve:router_retries_total", NS, "stage"), rate("pdserve:router_resumes_total", NS),
        rate("pdserve:router_request_failures_total", NS, "reason")], "ops",
        "Retries before the first token (by stage), streams resumed on another decode pod, requests that failed.")
    b.panel("In-flight requests by pod", [(f"sum by (exported_pod) (pdserve:router_pod_in_flight{{{NS}}})",
                                           "{{exported_pod}}")], "short", "Requests the routers have open to each pod.")
    b.panel("Pods in rotation", [(f"sum by (exported_role) (max by (exported_pod, exported_role) "
                                  f"(pdserve:router_pod_ready{{{NS}}}))", "{{exported_role}}")], "short",
            "Engine pods the routers currently send traffic to, by role.")
    b.panel("KV events per second", [rate("pdserve:router_kv_events_total", NS, "type"),
                                     (rate("pdserve:router_kv_event_gaps_total", NS)[0], "lost batches")], "ops",
            "Prefix-cache events from the engines that feed the prefix-aware scorer.")
    return b.json()


# The phase kinds of the router's request timeline (services/router/anatomy.py), in timeline order.
ANATOMY_KINDS = ("routing", "transit", "queue", "kv_load", "compute", "respond", "failed_attempt")
ANATOMY_BY = "exported_role, connector"  # the router's own role label is exported_role (see above)


def anatomy_mean(kind: str, by: str = ANATOMY_BY) -> tuple[str, str]:
    """(expr, legend) of the mean seconds one request spends in a phase kind, by role and connector."""
    metric = f"pdserve:request_{kind}_seconds"
    expr = (f"sum by ({by}) (rate({metric}_sum{{{NS}}}[{RATE}])) / "
            f"sum by ({by}) (rate({metric}_count{{{NS}}}[{RATE}]))")
    return expr, f"{kind} {{{{exported_role}}}} {{{{connector}}}}"


def anatomy() -> Obj:
    b = Board("pdserve-request-anatomy", "pdserve / Request anatomy",
              "Where a request's time to first token goes: the router's per-request timeline (routing, hand-offs, "
              "each pod's queue, KV load and compute), by role and KV connector. docs/observability.md.")
    b.row("Where the time to first token goes")
    b.panel("Mean seconds per phase (stacked)", [anatomy_mean(k) for k in ANATOMY_KINDS], "s",
            "Per request, the mean time in each phase kind, stacked: the stack's height is the mean time to the "
            "decode pod's first token (remote prefill) or to the first token (decode only). The tallest band is "
            "the cause.", stacked=True, width=24)
    b.panel("p90 per phase (stacked)", [
        (quantiles(f"pdserve:request_{k}_seconds", NS, by=ANATOMY_BY, qs=(0.9,))[0][0],
         f"{k} {{{{exported_role}}}} {{{{connector}}}}") for k in ANATOMY_KINDS], "s",
        "The 90th percentile of each phase kind, stacked (percentiles do not add up exactly; the shape shows the "
        "slow phase).", stacked=True)
    b.panel("Time to first token from the timeline, with slow-request exemplars",
            quantiles("pdserve:request_timeline_ttft_seconds", NS, by="connector"), "s",
            "The sum of each request's phases up to its first token. Exemplars (OpenMetrics scrapes) carry the "
            "trace id of a request; follow one to its trace.", exemplars=True)
    b.row("KV transfer and hand-offs")
    b.panel("KV load (waiting for and loading a prompt's KV)",
            quantiles("pdserve:request_kv_load_seconds", NS, by=ANATOMY_BY, qs=(0.5, 0.9, 0.99)), "s",
            "Per request, on the pod that loads it (decode after a remote prefill; prefill on a store hit).",
            exemplars=True)
    b.panel("KV bytes per request (p50)",
            quantiles("pdserve:request_kv_load_bytes", NS, by=ANATOMY_BY, qs=(0.5,)), "bytes",
            "Payload bytes one request's KV load moved, by role and connector.")
    b.panel("Hand-offs between router and pods (p90)",
            quantiles("pdserve:request_transit_seconds", NS, by="exported_role, direction", qs=(0.9,)), "s",
            "Router to pod and back: network, gRPC, the pods' event loops (and the hosts' clock offset).")
    b.panel("Pod compute to first token (p90)",
            quantiles("pdserve:request_compute_seconds", NS, by=ANATOMY_BY, qs=(0.9,)), "s",
            "From a pod's first scheduling (or the KV load's end) to its first token.", exemplars=True)
    b.panel("After the first token: streaming the rest (p50, p90)",
            quantiles("pdserve:request_stream_seconds", NS, by="connector", qs=(0.5, 0.9)), "s",
            "Router: from the first token after the prefill to the last token.")
    return b.json()


DASHBOARDS = {"pdserve-serving.json": serving, "pdserve-kv-transfer.json": kv_transfer, "pdserve-router.json": router,
              "pdserve-request-anatomy.json": anatomy}


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "charts/pdserve/dashboards")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
