"""The endpoints beyond completions and chat: Responses, Messages, Embeddings, one model, version, cache reset.

:func:`add_endpoints` mounts them on the app that :func:`~pdserve.services.api.app.build_app` builds, so every
serving role (monolithic server, decode pod, router) has them; each works through the role's engine client.
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.services.api.errors import ApiError
from pdserve.services.api.serving_embeddings import EmbeddingsRequest, EmbeddingsServing
from pdserve.services.api.serving_messages import MessagesRequest, MessagesServing, anthropic_error_body
from pdserve.services.api.serving_responses import ResponsesServing
from pdserve.services.api.responses_protocol import ResponsesRequest
from pdserve.services.api.settings import ServerSettings

# run(request, create, body, error_body) -> Response, and parse(request, model) -> body: the app's own.
Runner = Callable[..., Awaitable[Response]]
Parser = Callable[[Request, type], Awaitable[Any]]


def _version() -> str:
    try:
        return metadata.version("pdserve")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def add_endpoints(app: FastAPI, engine: Any, settings: ServerSettings, run: Runner, parse: Parser) -> None:
    """Mount the extra endpoints on ``app`` (see the module docstring)."""
    responses = ResponsesServing(engine, settings, store_size=settings.responses_store_size)
    messages = MessagesServing(engine, settings)
    embeddings = EmbeddingsServing(engine, settings)
    app.state.responses = responses  # the store, for tests and operators

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        return await run(request, responses.create, await parse(request, ResponsesRequest))

    @app.post("/v1/messages")
    async def create_message(request: Request) -> Response:
        try:
            body = await parse(request, MessagesRequest)
        except ApiError as err:
            return JSONResponse(anthropic_error_body(err), err.status, headers=err.headers())
        return await run(request, messages.create, body, anthropic_error_body)

    @app.post("/v1/embeddings")
    async def create_embeddings(request: Request) -> Response:
        return await run(request, embeddings.create, await parse(request, EmbeddingsRequest))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in settings.served_model_names:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                           f"{', '.join(settings.served_model_names)}", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "pdserve",
                "root": engine.model_name, "max_model_len": engine.max_model_len}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> JSONResponse:
        reset = getattr(engine, "reset_prefix_cache", None)
        if reset is None:
            raise ApiError(400, "this server's engine has no prefix cache to reset", code="unsupported")
        outcome = await reset()
        if isinstance(outcome, dict):  # a router: one outcome per pod
            ok = bool(outcome) and all(v == "ok" for v in outcome.values())
            return JSONResponse({"status": "ok" if ok else "partial", "pods": outcome}, 200 if ok else 409)
        if not outcome:
            raise ApiError(409, "the prefix cache was not reset: requests are holding KV blocks; retry when idle",
                           code="engine_busy")
        return JSONResponse({"status": "ok"})
