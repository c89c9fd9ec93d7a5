"""The HTTP edge of every pdserve server: who may call, how much they may send and how long they may take.

Three layers, outermost first:

* :func:`header_deadline_protocol` -- uvicorn's h11 protocol with a deadline on the request line and headers. uvicorn
  alone waits forever for a request that never completes its headers (a slow-loris client); here a connection
  whose headers are not complete ``header_timeout_s`` after it opened (or after its previous response) gets a 408
  and is closed. h11 already caps the header block at ``h11_max_incomplete_event_size`` bytes.
* :class:`GuardMiddleware` -- an ASGI middleware that checks the caller (:func:`.auth.check_credentials`), refuses
  a request framed both by Content-Length and Transfer-Encoding (400), refuses a body
  larger than ``max_body_bytes`` while it streams in (413; a chunked body has no Content-Length to check up front)
  and gives the whole body ``body_timeout_s`` to arrive (408): a body that stops, or a Content-Length larger than
  what is sent, no longer holds a connection open. Both errors close the connection.
* :func:`parse_json_body` -- the body as a JSON object, refusing with a 400 what the parser or the tokenizer would
  otherwise turn into a 500: nesting too deep for the parser, integers outside int64, and strings that are not
  Unicode text (a lone UTF-16 surrogate such as ``"\\ud800"``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from fastapi.responses import JSONResponse

from pdserve.services.api.auth import check_credentials
from pdserve.services.api.errors import ApiError, bad_request
from pdserve.services.api.settings import ServerSettings

# Paths that need the caller's credentials when the server has any (health and metrics stay open for probes and
# scrapers: they carry no request data).
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/router/", "/reset_prefix_cache")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# A JSON escape of a UTF-16 surrogate; only bodies that contain one need the (slower) full text check.


class GuardMiddleware:
    """Refuses unauthenticated calls (401), requests beyond ``max_concurrent_requests`` (429), oversized (413) and
    too slow (408) bodies before the app parses them."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.in_flight = 0  # protected requests being served (one event loop: no lock needed)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        protected = scope["path"].startswith(PROTECTED_PREFIXES)
        err = check_credentials(settings, headers) if protected else None
        length = headers.get("content-length")
        if err is None and length is not None and "transfer-encoding" in headers:
            # Two framings of one body: proxies in front may pick the other one (request smuggling). RFC 9112
            # lets a server refuse such a request; it must not reuse the connection either way.
            err = ApiError(400, "the request has both Content-Length and Transfer-Encoding", code="bad_framing")
        if err is None and length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            err = _too_large(settings)
        limit = settings.max_concurrent_requests
        if err is None and limit and protected and self.in_flight >= limit:
            err = ApiError(429, f"the server is serving {limit} requests already; retry later",
                           code="too_many_requests", retry_after=settings.retry_after_s)
        if err is not None:
            return await _send_error(err, scope, receive, send, close=err.status not in (401, 429))
        if protected:
            self.in_flight += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            if protected:
                self.in_flight -= 1

    async def _serve(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Run the app with the body counted and timed (see the module docstring)."""
        settings = self.settings

        received, body_done, failed = 0, False, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s if settings.body_timeout_s > 0 else None

        async def guarded_receive() -> dict:
            # Count the body as it arrives (chunked bodies carry no Content-Length) and bound the time it takes;
            # once the body is complete, receive() only waits for a disconnect, which has no deadline.
            nonlocal received, body_done, failed
            if body_done or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    failed = True
                    raise ApiError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s",
                                   code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > settings.max_body_bytes:
                    failed = True
                    raise _too_large(settings)
            return message

        started = False

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if failed:  # the rest of the body is still on the wire: this connection cannot be reused
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ApiError as exc:
            # Raised by guarded_receive under a middleware that reads the body before the app (the router's
            # session middleware); inside the app, its own handler answers.
            if started:
                raise
            await _send_error(exc, scope, receive, send, close=True)


def _too_large(settings: ServerSettings) -> ApiError:
    return ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes", code="request_too_large")


async def _send_error(err: ApiError, scope: dict, receive: Callable, send: Callable, close: bool) -> None:
    headers = err.headers()
    if close:
        headers["Connection"] = "close"
    body = err.body()
    if scope.get("path") == "/v1/messages":  # Anthropic's clients read Anthropic's error shape
        from pdserve.services.api.serving_messages import anthropic_error_body

        body = anthropic_error_body(err)
    await JSONResponse(body, err.status, headers=headers)(scope, receive, send)


class _OutOfRange(ValueError):
    """An integer in the body does not fit int64 (what every integer field of the API is, down to the engine)."""


def _check_values(value: Any) -> None:
    """Raise :class:`_OutOfRange` for an integer outside int64 and ``UnicodeEncodeError`` for a string holding a lone
    surrogate (not encodable as UTF-8), anywhere in ``value``."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            raise _OutOfRange
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_values(k)
            _check_values(v)
    elif isinstance(value, list):
        for v in value:
            _check_values(v)


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; a 400 ``ApiError`` naming the problem and, where one is to blame, the top-level
    field that holds it (never a Python exception repr)."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc.msg} at position {exc.pos}",
                          code="invalid_json") from None
    except ValueError:  # int() refusing an integer of thousands of digits
        raise bad_request("an integer in the request is too large", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    for key, value in data.items():
        try:
            _check_values(key)
            _check_values(value)
        except _OutOfRange:
            raise bad_request(f"{key} holds an integer outside the 64-bit range", param=key,
                              code="invalid_json") from None
        except UnicodeEncodeError:
            raise bad_request(f"{key} holds a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode text",
                              param=key, code="invalid_json") from None
        except RecursionError:
            raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    return data


def header_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol class, closing connections whose request headers take longer than the timeout.

    The deadline starts when the connection opens and again after each response (the next request on a kept-alive
    connection); it ends when a request's headers are complete. 0 disables it (uvicorn's own behaviour)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in
                self._disarm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            if header_timeout_s > 0:
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_deadline_passed)

        def _disarm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline_passed(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE and _has_partial_request(self):
                body = b'{"error":{"message":"the request headers did not arrive in time","type":"timeout_error"}}'
                try:
                    self.transport.write(self.conn.send(h11.Response(status_code=408, headers=[
                        (b"content-type", b"application/json"), (b"connection", b"close"),
                        (b"content-length", str(len(body)).encode())])))
                    self.transport.write(self.conn.send(h11.Data(data=body)))
                    self.transport.write(self.conn.send(h11.EndOfMessage()))
                except h11.LocalProtocolError:
                    pass
            self.transport.close()

    return HeaderDeadlineProtocol


def _has_partial_request(protocol: Any) -> bool:
    """Whether the client sent part of a request (then it gets a 408 first; an idle connection is just closed)."""
    return bool(protocol.conn.trailing_data[0])


def uvicorn_config(app: Any, settings: ServerSettings, **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` with the header deadline of ``settings`` (every pdserve HTTP server)."""
    import uvicorn

    return uvicorn.Config(app, http=header_deadline_protocol(settings.header_timeout_s), lifespan="off",
                          access_log=False, **kwargs)
