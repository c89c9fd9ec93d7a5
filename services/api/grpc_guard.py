"""The gRPC edge of every pdserve server: one interceptor in front of all its services.

It does for gRPC what :mod:`.guard` does for HTTP:

* **credentials** -- every method but the standard health check needs the caller's credentials when the server
  has any (:func:`.auth.check_credentials`: a call token signed with the cluster secret in ``x-pdserve-auth``, or
  ``authorization: Bearer <api key>``); otherwise ``UNAUTHENTICATED``. Kubernetes probes and the router's health
  checks use the open health service, which returns no data.
* **malformed messages** -- a request that does not parse as its protobuf type (corrupt wire format, a string
  field that is not UTF-8) ends with ``INVALID_ARGUMENT`` and a plain message. grpc's own handling reports
  ``UNKNOWN`` with the parser's exception text, and a client could not tell its own bug from a server fault.

Both wrap the method's handler, so every servicer mounted on the server (generation, prefill, decode) is covered
without checks of its own.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable

import grpc

from pdserve.services.api.auth import check_credentials
from pdserve.services.api.settings import ServerSettings

logger = logging.getLogger(__name__)

# Methods that stay open: they carry no request data (Kubernetes probes, the router's pod health checks).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class _Malformed:
    """Stands in for a request message that did not parse (its deserializer must not raise)."""


_MALFORMED = _Malformed()


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Checks credentials and message parsing before any servicer method runs."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        denial = None
        if not method.startswith(OPEN_METHOD_PREFIXES):
            metadata = {k.lower(): v for k, v in handler_call_details.invocation_metadata or ()
                        if isinstance(v, str)}
            err = check_credentials(self.settings, metadata)
            if err is not None:
                denial = err.message
        return _guarded(handler, method, denial)


def _guarded(handler: Any, method: str, denial: str | None) -> Any:
    """``handler`` with a deserializer that never raises and a behaviour that first refuses denied or malformed
    calls. Streaming-request methods keep their deserializer (pdserve has none) but get the credential check."""
    deserialize = handler.request_deserializer

    def safe_deserialize(raw: bytes) -> Any:
        try:
            return deserialize(raw) if deserialize is not None else raw
        except Exception:  # any parser failure is the client's: reported as INVALID_ARGUMENT below
            return _MALFORMED

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        if denial is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, denial)
        if request is _MALFORMED:
            logger.info("malformed %s request refused", method)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid protobuf message for {method}")

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(request, context)
            return await inner_uu(request, context)

        return handler._replace(unary_unary=unary_unary, request_deserializer=safe_deserialize)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(request, context)
            result = inner_us(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write()
                await result

        return handler._replace(unary_stream=unary_stream, request_deserializer=safe_deserialize)
    if denial is None:
        return handler
    for kind in ("stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            async def deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, denial)

            return handler._replace(**{kind: deny})
    return handler
