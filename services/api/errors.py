"""API errors: one exception type carrying everything an OpenAI error body and a gRPC status need.

Every failure a client can cause maps to a 4xx with a message that says what to change; 5xx is left for real
server faults (a dead engine is 503, not 500, because a restart fixes it).
"""

from __future__ import annotations

import re
from typing import Any

from pdserve.engine.frontend.errors import EngineDeadError, EngineNotReadyError, QueueFullError, RequestFailedError
from pdserve.engine.frontend.params_wire import PARAM_NAMES

# OpenAI's error "type" per HTTP status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable_error", 504: "timeout_error"}

# grpc.StatusCode names per HTTP status (the gRPC server maps with this table).
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED",
              413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED"}


class ApiError(Exception):
    """An error to send to the client: HTTP ``status``, OpenAI ``type``/``param``/``code``, and a message."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# Engine validation messages name the parameter first ("top_p must be in (0, 1]"); pick it out for "param".
_PARAM_RE = re.compile(r"^(?:each )?([a-z_]+)\b")
_KNOWN_PARAMS = set(PARAM_NAMES)  # every SamplingParams field


def from_value_error(exc: ValueError, default_param: str | None = None) -> ApiError:
    """A ``ValueError`` from validation (sampling params, prompt checks) as a 400."""
    message = str(exc)
    m = _PARAM_RE.match(message)
    param = m.group(1) if m and m.group(1) in _KNOWN_PARAMS else default_param
    if param is None and "max_tokens" in message:
        param = "max_tokens"  # "the prompt plus max_tokens exceeds the context": lowering max_tokens fixes it
    elif param is None and "prompt" in message:
        param = "prompt"
    code = "context_length_exceeded" if "context" in message else None
    return ApiError(400, message, param=param, code=code)


def from_exception(exc: BaseException, retry_after: int = 1) -> ApiError:
    """Map any exception raised while serving to the error the client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), code="queue_full", retry_after=retry_after)
    if isinstance(exc, EngineNotReadyError):
        return ApiError(503, str(exc), code="engine_not_ready", retry_after=retry_after)
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), code="engine_dead", retry_after=retry_after)
    if isinstance(exc, RequestFailedError):
        # The engine aborted this request and serves on. gRPC INTERNAL, which routers do not retry elsewhere:
        # the same request would fail the same way on every pod.
        return ApiError(500, f"the engine failed on this request: {exc}", code="request_failed")
    if isinstance(exc, TimeoutError):
        return ApiError(504, "the request timed out in the server", code="timeout")
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    return ApiError(500, f"internal server error: {type(exc).__name__}", code="internal_error")
