"""OpenTelemetry tracing: W3C ``traceparent`` across router -> prefill -> decode, a span per timeline phase.

Off unless configured: with no ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (or
``--otlp-traces-endpoint``) no tracer provider is installed, spans are not recorded and nothing is exported; the
trace context a client sends is still passed on to the pods, so a caller's trace stays whole. With an endpoint,
spans go out over OTLP/HTTP (protobuf POSTs to ``<endpoint>/v1/traces``) in batches.

What is traced:

* the router: a server span per HTTP request (parent: the client's ``traceparent``), a client span per pod call
  (``pdserve.v1.Prefill/Prefill``, ``pdserve.v1.Decode/Decode``, ``pdserve.v1.Generation/Generate``) whose context
  goes to the pod in the call's metadata, and, once a sequence finishes, one span per phase of its timeline
  (engine/frontend/timing.py) with the phase's own start and end;
* a pod: a server span per call (parent: the router's client span) with a span per phase it measured (queue,
  kv_load, compute, respond).

Without the ``opentelemetry`` packages (the ``serve`` extra installs them) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from pdserve.engine.frontend.timing import PodMarks, Timeline

logger = logging.getLogger(__name__)

try:  # the packages are in the serve extra; tracing is optional
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagate import extract, inject
except ImportError:  # pragma: no cover - exercised only without the extra
    trace = None  # type: ignore[assignment]

TRACER_NAME = "pdserve"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def configured_endpoint(flag: str | None = None) -> str | None:
    """The OTLP endpoint to export to: the flag, else the standard environment variables, else None."""
    if flag:
        return flag
    for name in _ENDPOINT_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def setup_tracing(service_name: str, endpoint: str | None = None) -> bool:
    """Install a tracer provider exporting to the configured OTLP/HTTP endpoint; False (nothing installed) when
    none is configured. Raises ``RuntimeError`` when one is configured but the packages are missing."""
    endpoint = configured_endpoint(endpoint)
    if endpoint is None:
        return False
    if trace is None:
        raise RuntimeError("an OTLP endpoint is configured but the opentelemetry packages are not installed "
                           "(pip install 'pdserve[serve]')")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The signal-specific variable is the whole URL; the generic one is a base the exporter appends /v1/traces to.
    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url), schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    logger.info("tracing: exporting spans of %s to %s", service_name, url)
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (at server shutdown), if one was installed."""
    if trace is None:
        return
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def _tracer() -> Any:
    return trace.get_tracer(TRACER_NAME)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def current_trace_id(context: Any = None) -> str | None:
    """The hex trace id of the current span (or ``context``'s; None outside a valid trace)."""
    if trace is None:
        return None
    ctx = trace.get_current_span(context).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


# ---------------------------------------------------------------------------------------------- HTTP (router)
class TracingMiddleware:
    """ASGI: a server span per API request, its parent the client's ``traceparent`` header (if any)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if trace is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        parent = extract(carrier)
        name = f"{scope.get('method', 'POST')} {scope['path']}"
        with _tracer().start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER,
                                             attributes={"http.request.method": scope.get("method", ""),
                                                         "url.path": scope["path"]}) as span:
            status: dict[str, int] = {}

            async def send_and_note(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            await self.app(scope, receive, send_and_note)
            if "code" in status:
                span.set_attribute("http.response.status_code", status["code"])


# ---------------------------------------------------------------------------------------------- gRPC (router)
@contextlib.contextmanager
def client_span(name: str, pod: str) -> Iterator[None]:
    """A client span around a call to a pod (its context goes out with :func:`outgoing_metadata`)."""
    if trace is None:
        yield
        return
    with _tracer().start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes={"pdserve.pod": pod}):
        yield


def outgoing_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata (``traceparent``, ``tracestate``); empty outside a trace."""
    if trace is None:
        return []
    carrier: dict[str, str] = {}
    inject(carrier)
    return list(carrier.items())


def current_context() -> Any:
    """The current trace context (to parent spans made later, elsewhere); None without the packages."""
    return otel_context.get_current() if trace is not None else None


def record_timeline(timeline: Timeline, parent: Any = None) -> None:
    """One span per phase of a finished sequence, children of ``parent`` (a :func:`current_context`; default:
    the current span), with the phases' own start and end times."""
    if trace is None or not trace.get_current_span(parent).is_recording():
        return
    tracer = _tracer()
    for phase in timeline.phases:
        span = tracer.start_span(phase.name, context=parent, start_time=_ns(phase.start), attributes={
            "pdserve.role": phase.role, "pdserve.pod": phase.pod, "pdserve.connector": phase.connector or "",
            **({"pdserve.kv_bytes": phase.kv_bytes} if phase.name.endswith("kv_load") else {})})
        span.end(end_time=_ns(max(phase.end, phase.start)))


# ---------------------------------------------------------------------------------------------- gRPC (pods)
class PodCallSpan:
    """A pod's server span for one call, its parent the router's client span (from the call's metadata).

    Not made the current span: the handlers are async generators, and the phases it gets are added
    explicitly (:meth:`add_phases`). A context manager: ``with PodCallSpan(name, context) as span:`` ends it."""

    def __init__(self, name: str, context: Any) -> None:
        self.span = None
        if trace is None:
            return
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        parent = extract(metadata)
        self.span = _tracer().start_span(name, context=parent, kind=trace.SpanKind.SERVER)

    def add_phases(self, marks: PodMarks) -> None:
        """The pod's own phases as child spans: queue, kv_load (when one happened), compute, respond."""
        if self.span is None or not self.span.is_recording() or not marks.complete:
            return
        tl = Timeline(marks.received, connector=marks.connector)
        tl.add_pod(marks.role or "pod", marks, "self", "hop")
        parent = trace.set_span_in_context(self.span)
        tracer = _tracer()
        for phase in tl.phases[1:]:  # [0] is the hop to the pod, which the router's span covers
            span = tracer.start_span(phase.name, context=parent, start_time=_ns(phase.start),
                                     attributes={"pdserve.role": phase.role,
                                                 "pdserve.connector": phase.connector or "",
                                                 **({"pdserve.kv_bytes": phase.kv_bytes}
                                                    if phase.name.endswith("kv_load") else {})})
            span.end(end_time=_ns(max(phase.end, phase.start)))

    def end(self, error: str | None = None) -> None:
        if self.span is None:
            return
        if error:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        self.span.end()

    def __enter__(self) -> "PodCallSpan":
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Every handler ends its span the same way, also when the call fails or the client cancels it.
        self.end()


__all__ = ["PodCallSpan", "TracingMiddleware", "client_span", "configured_endpoint", "current_context",
           "current_trace_id", "outgoing_metadata", "record_timeline", "setup_tracing", "shutdown_tracing"]
