"""Prometheus metrics, named ``pdserve:*`` after the vLLM metrics that dashboards already chart.

One :class:`ServingMetrics` per server, on its own registry (no global state, so tests and several servers in one
process never collide). It is a stat logger of the async engine: the engine calls :meth:`record` after every
step, and the app exposes :meth:`render` at ``/metrics``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pdserve.engine.frontend.stats import IterationStats
from pdserve.engine.core.sched_output import SchedulerStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges in seconds: from a fast GPU's decode step to a long CPU request.
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0)
_ITL = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
        1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_LONG = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
         960.0, 1920.0, 7680.0)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

FINISH_REASONS = ("stop", "length", "abort", "error")


class ServingMetrics:
    """The metric set of one served model (label ``model_name``)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pdserve:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pdserve:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"pdserve:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Sequences in model execution batches.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.")
        self.kv_cache_capacity_tokens = gauge("kv_cache_capacity_tokens", "Tokens the KV cache holds (blocks x "
                                              "block size): KV usage per token is its inverse.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Cumulative number of preemptions.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        self.requested_output_tokens = counter(
            "requested_output_tokens", "max_tokens of the sequences that arrived (what they may generate; the "
            "autoscaler sizes decode from it).")
        # Prompt tokens not computed, by where their KV came from: this engine's prefix cache, or a KV connector
        # (a decode pod loading what a prefill pod computed). What usage.prompt_tokens_details.cached_tokens sums.
        cached = Counter("pdserve:prompt_tokens_cached", "Prompt tokens not computed, by the source of their KV.",
                         ["model_name", "source"], registry=r)
        self.prompt_tokens_cached = {source: cached.labels(model_name, source)
                                     for source in ("prefix_cache", "connector")}
        success = Counter("pdserve:request_success", "Finished sequences, by finish reason.",
                          ["model_name", "finished_reason"], registry=r)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success = success
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between two tokens.", _ITL)
        self.time_per_output_token = histogram("time_per_output_token_seconds",
                                               "Mean time per output token of a request.", _ITL)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LONG)
        self.request_queue_time = histogram("request_queue_time_seconds", "Time waiting before scheduling.", _LONG)
        self.request_prefill_time = histogram("request_prefill_time_seconds", "Time in prefill.", _LONG)
        self.request_decode_time = histogram("request_decode_time_seconds", "Time in decode.", _LONG)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per engine step.", _TOKENS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Tokens generated by a finished sequence.", _TOKENS)
        self.request_params_max_tokens = histogram("request_params_max_tokens",
                                                   "max_tokens of a finished sequence.", _TOKENS)
        # Structured output (engine/structured_output): constrained sequences, grammar compiles and their time,
        # compiled grammars reused from the cache.
        self.structured_counters = {
            "num_requests": counter("structured_output_requests", "Sequences with a structured-output constraint."),
            "num_compiles": counter("structured_output_compiles", "Grammars compiled (cache misses)."),
            "compile_seconds": counter("structured_output_compile_seconds", "Time spent compiling grammars."),
            "cache_hits": counter("structured_output_cache_hits", "Constrained sequences that reused a compiled "
                                                                  "grammar."),
        }
        self._last_structured: dict[str, float] = {}
        # Speculative decoding (engine/spec_decode), named as vLLM names them: proposals verified, their tokens,
        # the accepted ones, and accepted ones by position in the proposal. Acceptance rate = accepted / draft
        # tokens; mean acceptance length = 1 + accepted / drafts (the dashboard computes both).
        self.spec_counters = {
            "num_drafts": counter("spec_decode_num_drafts", "Speculative proposals verified."),
            "num_draft_tokens": counter("spec_decode_num_draft_tokens", "Draft tokens verified."),
            "num_accepted_tokens": counter("spec_decode_num_accepted_tokens", "Draft tokens accepted."),
        }
        self._spec_per_pos = Counter("pdserve:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by position in the proposal (from 0).",
                                     ["model_name", "position"], registry=r)
        self._last_spec: dict[str, float] = {}
        self._last_spec_per_pos: list[int] = []
        # The engine reports cumulative counts; counters take the increments.
        self._last_queries = self._last_hits = self._last_preemptions = 0

    def record(self, stats: SchedulerStats | None, it: IterationStats) -> None:
        """Take one engine step's snapshot and iteration stats (the async engine's stat-logger interface)."""
        if stats is not None:
            self.num_requests_running.set(stats.num_running)
            self.num_requests_waiting.set(stats.num_waiting)
            self.kv_cache_usage_perc.set(stats.kv_cache_usage)
            self.kv_cache_capacity_tokens.set(stats.kv_capacity_tokens)
            self.prefix_cache_queries.inc(max(0, stats.prefix_cache_queries - self._last_queries))
            self.prefix_cache_hits.inc(max(0, stats.prefix_cache_hits - self._last_hits))
            self.num_preemptions.inc(max(0, stats.num_preemptions - self._last_preemptions))
            self._last_queries, self._last_hits = stats.prefix_cache_queries, stats.prefix_cache_hits
            self._last_preemptions = stats.num_preemptions
            for key, value in (stats.structured_output or {}).items():
                if key in self.structured_counters:
                    self.structured_counters[key].inc(max(0.0, value - self._last_structured.get(key, 0)))
                    self._last_structured[key] = value
            if stats.spec_decode:
                self._record_spec(stats.spec_decode)
        if it.num_step_tokens:
            self.iteration_tokens.observe(it.num_step_tokens)
        # Zero increments skipped: the router records every streamed delta, and each inc takes a lock.
        for counter, n in ((self.prompt_tokens, it.num_prompt_tokens),
                           (self.prompt_tokens_cached["prefix_cache"], it.num_prefix_cached_tokens),
                           (self.prompt_tokens_cached["connector"], it.num_connector_cached_tokens),
                           (self.generation_tokens, it.num_generation_tokens),
                           (self.requested_output_tokens, it.num_requested_output_tokens)):
            if n:
                counter.inc(n)
        for v in it.time_to_first_tokens:
            self.time_to_first_token.observe(v)
        for v in it.inter_token_latencies:
            self.inter_token_latency.observe(v)
        for f in it.finished:
            counter = self.request_success.get(f.finish_reason)
            if counter is None:
                counter = self.request_success[f.finish_reason] = self._success.labels(self.model_name,
                                                                                       f.finish_reason)
            counter.inc()
            self.e2e_request_latency.observe(f.e2e_latency)
            if f.max_tokens:  # the ratio of the two sums is how much of max_tokens requests use
                self.request_generation_tokens.observe(f.num_generation_tokens)
                self.request_params_max_tokens.observe(f.max_tokens)
            for value, hist in ((f.queue_time, self.request_queue_time), (f.prefill_time, self.request_prefill_time),
                                (f.decode_time, self.request_decode_time),
                                (f.mean_time_per_output_token, self.time_per_output_token)):
                if value is not None:
                    hist.observe(max(0.0, value))

    def _record_spec(self, spec: dict) -> None:
        for key, counter in self.spec_counters.items():
            value = spec.get(key, 0)
            counter.inc(max(0, value - self._last_spec.get(key, 0)))
            self._last_spec[key] = value
        per_pos = list(spec.get("accepted_per_pos", ()))
        for pos, value in enumerate(per_pos):
            last = self._last_spec_per_pos[pos] if pos < len(self._last_spec_per_pos) else 0
            self._spec_per_pos.labels(self.model_name, str(pos)).inc(max(0, value - last))
        self._last_spec_per_pos = per_pos

    def render(self) -> bytes:
        """The text exposition format for ``/metrics``."""
        return generate_latest(self.registry)

    def render_for(self, accept: str) -> tuple[bytes, str]:
        """``/metrics`` in the format the scraper accepts, with its content type: OpenMetrics when asked (it
        carries the exemplars -- trace ids of requests -- the router's timeline histograms hold), else text."""
        if "application/openmetrics-text" in accept:
            from prometheus_client.openmetrics import exposition as openmetrics

            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return self.render(), CONTENT_TYPE


class CoreMetrics:
    """Per-core metrics of a data-parallel server (label ``engine``, the core's index), on the server's registry:
    how the load is split. Each core's stat logger is :meth:`for_core`."""

    def __init__(self, model_name: str, registry: CollectorRegistry, size: int) -> None:
        labels = ["model_name", "engine"]

        def family(kind: type, name: str, doc: str):
            return kind(f"pdserve:engine_{name}", doc, labels, registry=registry)

        running = family(Gauge, "num_requests_running", "Sequences in one engine core's batches.")
        waiting = family(Gauge, "num_requests_waiting", "Sequences waiting in one engine core.")
        usage = family(Gauge, "kv_cache_usage_perc", "One engine core's KV cache usage; 1 means 100 percent.")
        tokens = family(Counter, "generation_tokens", "Generation tokens one engine core produced.")
        finished = family(Counter, "requests_finished", "Sequences one engine core finished.")
        self._cores = [_CoreLogger(*(m.labels(model_name, str(i)) for m in (running, waiting, usage, tokens,
                                                                            finished))) for i in range(size)]

    def __len__(self) -> int:
        return len(self._cores)

    def for_core(self, index: int) -> "_CoreLogger":
        return self._cores[index]


class _CoreLogger:
    def __init__(self, running: Any, waiting: Any, usage: Any, tokens: Any, finished: Any) -> None:
        self.running, self.waiting, self.usage, self.tokens, self.finished = running, waiting, usage, tokens, finished

    def record(self, stats: SchedulerStats | None, it: IterationStats) -> None:
        if stats is not None:
            self.running.set(stats.num_running)
            self.waiting.set(stats.num_waiting)
            self.usage.set(stats.kv_cache_usage)
        self.tokens.inc(it.num_generation_tokens)
        self.finished.inc(len(it.finished))


class MetricsListener:
    """``/metrics`` of ``registry`` on a port of its own (``--metrics-port``), in a daemon thread.

    A separate listener lets a NetworkPolicy open the metrics to Prometheus without opening the API port; the
    API port keeps its own ``/metrics`` for single-machine use (docs/kubernetes.md says so).
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
