"""Request anatomy at the router: per-phase histograms and the access log, from each sequence's timeline.

Every phase of :class:`~pdserve.engine.frontend.timing.Timeline` goes into one histogram family by its kind, with
the role it ran in (router, prefill, decode, both) and the deployment's KV connector as labels::

    routing                      -> pdserve:request_routing_seconds
    router_to_<role>, <role>_to_router
                                 -> pdserve:request_transit_seconds{direction="to_pod"|"from_pod"}
    <role>_queue                 -> pdserve:request_queue_seconds
    <role>_kv_load               -> pdserve:request_kv_load_seconds  (+ pdserve:request_kv_load_bytes)
    <role>_compute               -> pdserve:request_compute_seconds
    <role>_respond, router_respond -> pdserve:request_respond_seconds
    decode_stream                -> pdserve:request_stream_seconds
    failed_attempt               -> pdserve:request_failed_attempt_seconds
    (the sum up to the first token) -> pdserve:request_timeline_ttft_seconds

The sum of a request's TTFT phases is its time to first token as the router measured it, so stacking the
quantiles of these histograms by phase shows where the time goes (the chart's "request anatomy" dashboard).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from pdserve.engine.frontend.timing import Phase, Timeline

access_logger = logging.getLogger("pdserve.access")

# Seconds: from sub-millisecond hand-offs to multi-second prefills and transfers.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0)
_BYTES = tuple(float(4 ** i * 1024) for i in range(12))  # 1 KiB .. 4 GiB

KINDS = ("routing", "transit", "queue", "kv_load", "compute", "respond", "stream", "failed_attempt")


def phase_kind(name: str) -> tuple[str, dict[str, str]]:
    """The histogram kind of a phase name, and its extra labels (the transit direction)."""
    if name.startswith("router_to_"):
        return "transit", {"direction": "to_pod"}
    if name.endswith("_to_router"):
        return "transit", {"direction": "from_pod"}
    for kind in ("kv_load", "queue", "compute", "respond", "stream"):
        if name.endswith("_" + kind):
            return kind, {}
    if name in ("routing", "failed_attempt"):
        return name, {}
    return "transit", {"direction": "unsplit"}  # a pod that sent no marks: the whole round trip


class AnatomyMetrics:
    """The ``pdserve:request_*_seconds`` histograms (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def hist(kind: str, doc: str, extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(f"pdserve:request_{kind}_seconds", doc, ["role", "connector", *extra],
                             buckets=_BUCKETS, registry=registry)

        self.by_kind = {
            "routing": hist("routing", "Router: request received to routing decision (tokenize, validate, route)."),
            "transit": hist("transit", "Hand-offs between the router and a pod (network, gRPC, the pod's event "
                                       "loop), by direction.", ("direction",)),
            "queue": hist("queue", "A pod: call received to KV load start or first scheduling."),
            "kv_load": hist("kv_load", "A pod: waiting for and loading a prompt's KV through the connector."),
            "compute": hist("compute", "A pod: first scheduled (or KV loaded) to the first token."),
            "respond": hist("respond", "First token from the engine core to the handler sending it on (pods), "
                                       "or from the pod's answer to the client stream (router)."),
            "stream": hist("stream", "Router: first token after the prefill to the last token."),
            "failed_attempt": hist("failed_attempt", "Router: time lost on an attempt that failed."),
        }
        self.kv_bytes = Histogram("pdserve:request_kv_load_bytes", "Payload bytes one request's KV load moved.",
                                  ["role", "connector"], buckets=_BYTES, registry=registry)
        self.ttft = Histogram("pdserve:request_timeline_ttft_seconds", "The sum of a request's phases up to its "
                              "first token (equals its time to first token at the router).", ["connector"],
                              buckets=_BUCKETS, registry=registry)

    def observe(self, timeline: Timeline, exemplar: dict[str, str] | None = None) -> None:
        """Count one finished sequence's phases (``exemplar``: the trace id that links a slow one to its trace)."""
        connector = timeline.connector or "none"
        for phase in timeline.phases:
            kind, extra = phase_kind(phase.name)
            self.by_kind[kind].labels(role=phase.role, connector=connector, **extra).observe(
                max(phase.seconds, 0.0), exemplar=exemplar)
            if kind == "kv_load":
                self.kv_bytes.labels(phase.role, connector).observe(phase.kv_bytes)
        if timeline.ttft is not None:
            self.ttft.labels(connector).observe(max(timeline.ttft, 0.0), exemplar=exemplar)


def access_line(timeline: Timeline, *, request_id: str, index: int, finish_reason: str, num_prompt_tokens: int,
                num_generation_tokens: int, trace_id: str | None, as_json: bool) -> str:
    """The access-log line of one finished sequence: outcome, tokens, TTFT and every phase's milliseconds."""
    record: dict[str, Any] = {"request_id": request_id, "index": index, "finish_reason": finish_reason,
                              "prompt_tokens": num_prompt_tokens, "generation_tokens": num_generation_tokens,
                              "ttft_ms": _ms(timeline.ttft), "total_ms": _ms(timeline.end - timeline.start),
                              "connector": timeline.connector or None, "trace_id": trace_id,
                              "phases_ms": _phase_ms(timeline.phases),
                              "pods": sorted({p.pod for p in timeline.phases if p.role != "router"})}
    if as_json:
        return json.dumps(record, separators=(",", ":"))
    phases = " ".join(f"{k}={v}" for k, v in record["phases_ms"].items())
    return (f"request={request_id} index={index} finish={finish_reason} prompt_tokens={num_prompt_tokens} "
            f"generation_tokens={num_generation_tokens} ttft_ms={record['ttft_ms']} total_ms={record['total_ms']} "
            f"connector={record['connector'] or '-'} pods={','.join(record['pods']) or '-'} "
            f"trace_id={trace_id or '-'} {phases}")


def _phase_ms(phases: list[Phase]) -> dict[str, float | None]:
    """Milliseconds per phase name (a phase that repeats, e.g. routing after a failed attempt, is summed)."""
    out: dict[str, float] = {}
    for p in phases:
        out[p.name] = out.get(p.name, 0.0) + p.seconds
    return {name: _ms(s) for name, s in out.items()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
