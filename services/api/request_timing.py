"""The opt-in timing extension of the OpenAI API: ``x-pdserve-timing: 1`` on a request returns its timeline.

Off by default. A request that carries the header gets:

* in the body: a ``pdserve_timing`` object (engine/frontend/timing.py ``Timeline.as_dict``) on a non-streamed
  response, or in one more chunk before ``data: [DONE]`` (``choices: []``, like the usage chunk) when streamed;
* a response header ``x-pdserve-timing`` (``ttft=12.34;routing=0.41;...``, milliseconds) on non-streamed
  responses (a streamed response's headers leave before its first token).

With ``n > 1`` or several prompts the timeline is that of the first sequence to finish. The router's timeline
covers routing, the pods and the hand-offs between them; a single server's (``pdserve serve``) its own queue, KV
load and compute. docs/observability.md lists the phases.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pdserve.engine.frontend import timing
from pdserve.engine.frontend.timing import RequestTiming, engine_timeline, header_from_dict

REQUEST_HEADER = b"x-pdserve-timing"
RESPONSE_HEADER = b"x-pdserve-timing"
_TRUE = {b"1", b"true", b"yes", b"on"}


class TimingMiddleware:
    """ASGI, outermost: marks when each API request arrived (the timeline's start), notes whether the client
    asked for the timeline, and adds the response header once a handler has set it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        received = time.time()
        raw = next((v for k, v in scope.get("headers", []) if k.lower() == REQUEST_HEADER), None)
        if raw is not None and raw.strip().lower() not in _TRUE | {b"0", b"false", b"no", b"off"}:
            from pdserve.services.api.errors import bad_request
            from fastapi.responses import JSONResponse

            err = bad_request("the x-pdserve-timing header must be 1 or 0", param="x-pdserve-timing")
            return await JSONResponse(err.body(), err.status)(scope, receive, send)
        state = RequestTiming(received, wanted=raw is not None and raw.strip().lower() in _TRUE)
        token = timing.CURRENT.set(state)

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start" and state.header:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (RESPONSE_HEADER, state.header.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_header if state.wanted else send)
        finally:
            timing.CURRENT.reset(token)


def wanted() -> bool:
    """Whether the request being handled asked for its timeline."""
    current = timing.CURRENT.get()
    return current is not None and current.wanted


def timeline_of(out: Any, engine: Any) -> dict[str, Any] | None:
    """The timeline of a finished output: the router's own (``out.timeline``), else one built from a local
    engine's marks (``out.timing``) and the request's arrival; None when neither is known."""
    made = getattr(out, "timeline", None)
    if made is not None:
        return made
    marks = getattr(out, "timing", None)
    current = timing.CURRENT.get()
    if not marks or current is None or "delivered" not in marks:
        return None
    kv = getattr(getattr(engine, "config", None), "kv_transfer", None)
    tl = engine_timeline(current.received, marks, marks["delivered"], marks.get("finished", marks["delivered"]),
                         kv.role if kv is not None else "both", kv.connector if kv is not None else None, "self")
    return tl.as_dict()


def publish(body: dict[str, Any], timeline: dict[str, Any] | None) -> None:
    """Put a timeline into a response body and the pending response header (when the client asked)."""
    if timeline is None or not wanted():
        return
    body["pdserve_timing"] = timeline
    current = timing.CURRENT.get()
    if current is not None:
        current.header = header_from_dict(timeline)
