"""The Grafana dashboards shipped in the chart, built from code so every query is written once.

Regenerate the chart's JSON files after a change with::

    python -m pdserve.operator.dashboards charts/pdserve/dashboards

A test fails when the files are stale, and another checks that every PromQL expression names only metrics of
:mod:`pdserve.operator.metrics_catalog`. Panels group by ``role``, the label the ServiceMonitors copy from each
pod's ``pdserve.io/role`` label, so one dashboard shows prefill, decode and router side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
SEL = 'namespace=~"$namespace", model_name=~"$model"'
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    """(expr, legend) of histogram quantiles of ``metric``, optionally split by a label."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
             f"p{int(q * 100)}{suffix}") for q in qs]


def rate(metric: str, by: str, extra: str = "") -> tuple[str, str]:
    selector = f"{SEL}, {extra}" if extra else SEL
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))", "{{" + by + "}}"


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
              kind: str = "timeseries", width: int = 12) -> None:
        if self.x + width > 24:
            self._newline()
        self.panels.append({
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": self.x, "y": self.y, "w": width, "h": 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
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
    b.row("Latency")
    b.panel("Time to first token", quantiles("pdserve:time_to_first_token_seconds"), "s",
            "From arrival to the first generated token (includes remote prefill and the KV hand-over).")
    b.panel("Inter-token latency", quantiles("pdserve:inter_token_latency_seconds"), "s",
            "Gap between consecutive streamed tokens.")
    b.panel("Time per output token", quantiles("pdserve:time_per_output_token_seconds"), "s",
            "Decode time divided by the tokens generated after the first.")
    b.panel("End-to-end latency", quantiles("pdserve:e2e_request_latency_seconds"), "s",
            "From arrival to the last token.")
    b.panel("Queue, prefill and decode time (p90)",
            [(quantiles(m, qs=(0.9,))[0][0], label) for m, label in (
                ("pdserve:request_queue_time_seconds", "queue"), ("pdserve:request_prefill_time_seconds", "prefill"),
                ("pdserve:request_decode_time_seconds", "decode"))], "s",
            "Where a request's time goes, per phase.")
    b.row("Throughput")
    b.panel("Tokens per second", [
        (f"sum(rate(pdserve:prompt_tokens_total{{{SEL}}}[{RATE}]))", "prompt"),
        (f"sum(rate(pdserve:generation_tokens_total{{{SEL}}}[{RATE}]))", "generated")], "tok/s",
        "Prompt tokens processed and tokens generated, all pods.")
    b.panel("Finished requests per second", [rate("pdserve:request_success_total", "finished_reason")], "reqps",
            "By why they finished (stop, length, abort).")
    b.panel("Tokens per scheduler step (p50, p90)", quantiles("pdserve:iteration_tokens_total", qs=(0.5, 0.9)),
            "short", "How full each engine step's token budget is.")
    b.panel("Preemptions per second", [rate("pdserve:num_preemptions_total", "pod")], "ops",
            "Requests evicted to free KV cache; sustained preemption means too little KV memory.")
    b.row("Queues and KV cache")
    b.panel("Running requests", [(f"sum by (role) (pdserve:num_requests_running{{{SEL}}})", "{{role}}")], "short",
            "Requests in the engines' running batches, by role.")
    b.panel("Waiting requests (queue depth)",
            [(f"sum by (role) (pdserve:num_requests_waiting{{{SEL}}})", "{{role}}")], "short",
            "Requests waiting for a batch slot, by role.")
    b.panel("KV cache usage", [(f"max by (pod) (pdserve:kv_cache_usage_perc{{{SEL}}})", "{{pod}}")],
            "percentunit", "Share of each pod's KV cache blocks in use.")
    b.panel("Prefix cache hit rate", [
        (f"sum by (role) (rate(pdserve:prefix_cache_hits_total{{{SEL}}}[{RATE}])) / "
         f"sum by (role) (rate(pdserve:prefix_cache_queries_total{{{SEL}}}[{RATE}]))", "{{role}}")],
        "percentunit", "Prompt tokens found in the prefix cache, of the tokens looked up.")
    b.row("Replicas")
    b.panel("Prefill and decode pods", [
        (f'count by (role) (pdserve:num_requests_running{{{SEL}, role=~"prefill|decode"}})', "{{role}}")],
        "short", "Pods reporting metrics, by role.")
    b.panel("P:D ratio", [(f'count(pdserve:num_requests_running{{{SEL}, role="prefill"}}) / '
                           f'count(pdserve:num_requests_running{{{SEL}, role="decode"}})', "prefill per decode")],
            "short", "Prefill pods per decode pod.", kind="stat")
    return b.json()


def kv_transfer() -> Obj:
    b = Board("pdserve-kv-transfer", "pdserve / KV transfer",
              "KV cache hand-over from prefill to decode pods, by connector (shared-fs, grpc, redis).")
    b.row("Volume")
    b.panel("Bytes per second", [rate("pdserve:kv_transfer_bytes_total", "connector")], "Bps",
            "KV bytes moved, by connector.")
    b.panel("Blocks per second", [rate("pdserve:kv_transfer_blocks_total", "connector")], "ops",
            "KV blocks moved, by connector.")
    b.row("Latency and failures")
    b.panel("Transfer latency", quantiles("pdserve:kv_transfer_latency_seconds", by="connector", qs=(0.5, 0.99)),
            "s", "Time to move one request's KV blocks.")
    b.panel("Failures per second", [(f"sum by (connector, reason) (rate(pdserve:kv_transfer_failures_total"
                                     f"{{{SEL}}}[{RATE}]))", "{{connector}}: {{reason}}")], "ops",
            "Failed loads (the decode pod then recomputes the prompt), by reason.")
    b.panel("Blocks held under lease", [(f"sum by (pod) (pdserve:kv_blocks_held_under_lease{{{SEL}}})", "{{pod}}")],
            "short", "Blocks a prefill pod keeps until a decode pod acknowledges them.")
    return b.json()


def router() -> Obj:
    b = Board("pdserve-router", "pdserve / Router",
              "The router's choices: scorers, prefix hits, prefill/decode decisions, retries and resumes.")
    b.row("Decisions")
    b.panel("Decisions per second by plugin", [rate("pdserve:router_decisions_total", "plugin")], "ops",
            "Requests routed, by the plugin whose score decided.")
    b.panel("Decisions per second by pod", [rate("pdserve:router_decisions_total", "pod")], "ops",
            "Where requests went.")
    b.panel("Remote prefill or decode only", [rate("pdserve:router_pd_decisions_total", "decision")], "ops",
            "The P/D decider's choices.")
    b.panel("Prefix hit ratio of routed requests", quantiles("pdserve:router_prefix_hit_ratio", qs=(0.5, 0.9)),
            "percentunit", "Share of each prompt already cached on the chosen pod.")
    b.row("Reliability")
    b.panel("Retries and resumes per second", [
        (f"sum(rate(pdserve:router_retries_total{{{SEL}}}[{RATE}]))", "retries"),
        (f"sum(rate(pdserve:router_resumes_total{{{SEL}}}[{RATE}]))", "resumes")], "ops",
        "Retries before the first token; streams resumed on another decode pod.")
    b.panel("In-flight requests by pod", [(f"sum by (pod) (pdserve:router_inflight_requests{{{SEL}}})", "{{pod}}")],
            "short", "Requests the router has open to each pod.")
    return b.json()


DASHBOARDS = {"pdserve-serving.json": serving, "pdserve-kv-transfer.json": kv_transfer, "pdserve-router.json": router}


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
