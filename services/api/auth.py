"""Who may call a server: one rule for its HTTP API and its gRPC services.

A server has up to two credentials (both in :class:`ServerSettings`):

* ``cluster_secret`` -- pdserve's own parts (the router) sign every call with a fresh call token under the
  deployment's secret, sent as ``x-pdserve-auth`` (HTTP header or gRPC metadata) for the scope
  :data:`ENGINE_SCOPE`;
* ``api_key`` -- a user calling the server directly sends ``Authorization: Bearer <key>`` (or, as Anthropic's
  clients do, ``x-api-key: <key>``).

A call passes when it carries either valid credential; with neither configured the server is open (a standalone
``pdserve serve`` without ``--api-key`` on a trusted machine). Health checks and metrics need none.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from pdserve.engine.security import AUTH_HEADER, AuthError
from pdserve.services.api.errors import ApiError
from pdserve.services.api.settings import ServerSettings

# The scope of the call tokens the router signs for engine pods (HTTP and gRPC alike).
ENGINE_SCOPE = "engine"


def check_credentials(settings: ServerSettings, headers: Mapping[str, str]) -> ApiError | None:
    """None when the call (lower-case header or metadata names) may proceed, else the 401 to answer."""
    secret, api_key = settings.cluster_secret, settings.api_key
    if secret is None and not api_key:
        return None
    token = headers.get(AUTH_HEADER)
    token_problem = None
    if secret is not None and token:
        try:
            secret.verify_call(ENGINE_SCOPE, token)
            return None
        except AuthError as exc:
            token_problem = str(exc)
    if api_key:
        given = headers.get("authorization", "").encode()
        if hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            return None
        # Anthropic's clients send the key as x-api-key.
        if hmac.compare_digest(headers.get("x-api-key", "").encode(), api_key.encode()):
            return None
    if token_problem is not None:
        message = token_problem
    elif api_key:
        message = "invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')"
    else:
        message = f"missing {AUTH_HEADER}: this server takes calls from pdserve's own parts only"
    return ApiError(401, message, code="invalid_api_key")

