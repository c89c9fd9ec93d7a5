"""The Prometheus metrics pdserve's pods export, as the dashboards may use them.

A plain list so a test can compare it with the dashboards' PromQL (and, later, with the code that defines the
metrics). Names are as exposed: counters end in ``_total``; a histogram ``h`` is queried as ``h_bucket``,
``h_sum`` and ``h_count``.
"""

from __future__ import annotations

# (name, type, labels besides the scrape's own)
METRICS: list[tuple[str, str, tuple[str, ...]]] = [
    # engine (every prefill, decode and monolithic pod)
    ("pdserve:num_requests_running", "gauge", ("model_name",)),
    ("pdserve:num_requests_waiting", "gauge", ("model_name",)),
    ("pdserve:kv_cache_usage_perc", "gauge", ("model_name",)),
    ("pdserve:prefix_cache_queries_total", "counter", ("model_name",)),
    ("pdserve:prefix_cache_hits_total", "counter", ("model_name",)),
    ("pdserve:num_preemptions_total", "counter", ("model_name",)),
    ("pdserve:prompt_tokens_total", "counter", ("model_name",)),
    ("pdserve:generation_tokens_total", "counter", ("model_name",)),
    ("pdserve:request_success_total", "counter", ("model_name", "finished_reason")),
    ("pdserve:time_to_first_token_seconds", "histogram", ("model_name",)),
    ("pdserve:inter_token_latency_seconds", "histogram", ("model_name",)),
    ("pdserve:time_per_output_token_seconds", "histogram", ("model_name",)),
    ("pdserve:e2e_request_latency_seconds", "histogram", ("model_name",)),
    ("pdserve:request_queue_time_seconds", "histogram", ("model_name",)),
    ("pdserve:request_prefill_time_seconds", "histogram", ("model_name",)),
    ("pdserve:request_decode_time_seconds", "histogram", ("model_name",)),
    ("pdserve:iteration_tokens_total", "histogram", ("model_name",)),
    # KV transfer (prefill and decode pods)
    ("pdserve:kv_transfer_bytes_total", "counter", ("model_name", "connector")),
    ("pdserve:kv_transfer_blocks_total", "counter", ("model_name", "connector")),
    ("pdserve:kv_transfer_latency_seconds", "histogram", ("model_name", "connector")),
    ("pdserve:kv_transfer_failures_total", "counter", ("model_name", "connector", "reason")),
    ("pdserve:kv_blocks_held_under_lease", "gauge", ("model_name", "connector")),
    # router
    ("pdserve:router_decisions_total", "counter", ("model_name", "plugin", "pod")),
    ("pdserve:router_prefix_hit_ratio", "histogram", ("model_name",)),
    ("pdserve:router_pd_decisions_total", "counter", ("model_name", "decision")),
    ("pdserve:router_retries_total", "counter", ("model_name",)),
    ("pdserve:router_resumes_total", "counter", ("model_name",)),
    ("pdserve:router_inflight_requests", "gauge", ("model_name", "pod")),
]


def series_names() -> set[str]:
    """Every series name a PromQL expression may select (histograms expand to their three series)."""
    names: set[str] = set()
    for name, kind, _ in METRICS:
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names
