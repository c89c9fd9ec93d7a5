"""The Prometheus metrics pdserve's pods export, as the dashboards may use them.

A plain list so a test can compare it with the dashboards' PromQL (and, later, with the code that defines the
metrics). Names are as exposed: counters end in ``_total``; a histogram ``h`` is queried as ``h_bucket``,
``h_sum`` and ``h_count``.
"""

from __future__ import annotations

# (name as exposed, type, labels besides the scrape's own). Where the code and the original plan differed, the
# code wins (tests/charts/test_chart_dashboards.py compares this list with the metrics the code registers).
METRICS: list[tuple[str, str, tuple[str, ...]]] = [
    # every engine (prefill, decode, monolithic) and the router (the same set, as its clients see it)
    ("pdserve:num_requests_running", "gauge", ("model_name",)),
    ("pdserve:num_requests_waiting", "gauge", ("model_name",)),
    ("pdserve:kv_cache_usage_perc", "gauge", ("model_name",)),
    ("pdserve:kv_cache_capacity_tokens", "gauge", ("model_name",)),  # the autoscaler costs sequences with it
    ("pdserve:requested_output_tokens_total", "counter", ("model_name",)),  # max_tokens, counted at arrival
    ("pdserve:request_generation_tokens", "histogram", ("model_name",)),
    ("pdserve:request_params_max_tokens", "histogram", ("model_name",)),
    ("pdserve:prefix_cache_queries_total", "counter", ("model_name",)),
    ("pdserve:prefix_cache_hits_total", "counter", ("model_name",)),
    ("pdserve:num_preemptions_total", "counter", ("model_name",)),
    ("pdserve:prompt_tokens_total", "counter", ("model_name",)),
    ("pdserve:prompt_tokens_cached_total", "counter", ("model_name", "source")),
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
    # structured output (every engine; engine/structured_output)
    ("pdserve:structured_output_requests_total", "counter", ("model_name",)),
    ("pdserve:structured_output_compiles_total", "counter", ("model_name",)),
    ("pdserve:structured_output_compile_seconds_total", "counter", ("model_name",)),
    ("pdserve:structured_output_cache_hits_total", "counter", ("model_name",)),
    # speculative decoding (engines started with --speculative-config; engine/spec_decode)
    ("pdserve:spec_decode_num_drafts_total", "counter", ("model_name",)),
    ("pdserve:spec_decode_num_draft_tokens_total", "counter", ("model_name",)),
    ("pdserve:spec_decode_num_accepted_tokens_total", "counter", ("model_name",)),
    ("pdserve:spec_decode_num_accepted_tokens_per_pos_total", "counter", ("model_name", "position")),
    # KV transfer (prefill and decode pods; engine/kv_transfer/metrics.py)
    ("pdserve:kv_transfer_bytes_total", "counter", ("model_name", "connector", "direction")),
    ("pdserve:kv_transfer_blocks_total", "counter", ("model_name", "connector", "direction")),
    ("pdserve:kv_transfer_latency_seconds", "histogram", ("model_name", "connector", "direction")),
    ("pdserve:kv_transfer_failures_total", "counter", ("model_name", "connector", "reason")),
    ("pdserve:kv_transfer_blocks_held", "gauge", ("model_name", "connector")),
    # router (services/router/metrics.py; no model_name label)
    ("pdserve:router_plugin_decisions_total", "counter", ("profile", "plugin")),
    ("pdserve:router_filtered_pods_total", "counter", ("profile", "plugin")),
    ("pdserve:router_pd_decisions_total", "counter", ("decision", "reason")),
    ("pdserve:router_prompt_tokens_total", "counter", ()),
    ("pdserve:router_prefix_hit_tokens_total", "counter", ()),
    ("pdserve:router_prefix_hit_ratio", "histogram", ()),
    ("pdserve:router_retries_total", "counter", ("stage",)),
    ("pdserve:router_resumes_total", "counter", ()),
    ("pdserve:router_request_failures_total", "counter", ("reason",)),
    ("pdserve:router_pod_requests_total", "counter", ("pod",)),
    ("pdserve:router_pod_in_flight", "gauge", ("pod",)),
    ("pdserve:router_pod_ready", "gauge", ("pod", "role")),
    ("pdserve:router_kv_events_total", "counter", ("pod", "type")),
    ("pdserve:router_kv_event_gaps_total", "counter", ("pod",)),
    # request anatomy (the router's per-request timeline; services/router/anatomy.py)
    ("pdserve:request_routing_seconds", "histogram", ("role", "connector")),
    ("pdserve:request_transit_seconds", "histogram", ("role", "connector", "direction")),
    ("pdserve:request_queue_seconds", "histogram", ("role", "connector")),
    ("pdserve:request_kv_load_seconds", "histogram", ("role", "connector")),
    ("pdserve:request_compute_seconds", "histogram", ("role", "connector")),
    ("pdserve:request_respond_seconds", "histogram", ("role", "connector")),
    ("pdserve:request_stream_seconds", "histogram", ("role", "connector")),
    ("pdserve:request_failed_attempt_seconds", "histogram", ("role", "connector")),
    ("pdserve:request_kv_load_bytes", "histogram", ("role", "connector")),
    ("pdserve:request_timeline_ttft_seconds", "histogram", ("connector",)),
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
