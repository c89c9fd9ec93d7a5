"""Administrative calls the router fans out to its pods (``POST /reset_prefix_cache``).

The pods' own HTTP API does the work (each runs :func:`pdserve.services.api.app.build_app`); the router signs each
call with the cluster secret, as it signs its gRPC calls. A pod without a known HTTP address is reported, not
skipped silently.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

import httpx

from pdserve.engine.security import ClusterSecret
from pdserve.services.api.auth import ENGINE_SCOPE
from pdserve.services.router.types import Endpoint


def _message(response: httpx.Response) -> str:
    try:
        err = response.json().get("error", {})
        return str(err.get("message") or response.text[:200])
    except (ValueError, AttributeError):
        return response.text[:200]


async def reset_prefix_caches(pods: Iterable[Endpoint], secret: ClusterSecret | None,
                              timeout_s: float = 10.0) -> dict[str, str]:
    """``POST /reset_prefix_cache`` on every pod at once; per pod name: ``"ok"`` or what went wrong."""

    async def one(client: httpx.AsyncClient, pod: Endpoint) -> tuple[str, str]:
        if not pod.url:
            return pod.name, "not reset: the router knows no HTTP address for this pod"
        headers = secret.call_headers(ENGINE_SCOPE) if secret is not None else {}
        try:
            response = await client.post(pod.url.rstrip("/") + "/reset_prefix_cache", headers=headers)
        except httpx.HTTPError as exc:
            return pod.name, f"not reset: {type(exc).__name__}: {exc}"
        if response.status_code == 200:
            return pod.name, "ok"
        return pod.name, f"not reset: HTTP {response.status_code}: {_message(response)}"

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        results: list[Any] = await asyncio.gather(*(one(client, p) for p in pods))
    return dict(results)
