"""The OpenAI-compatible HTTP app, built around any :class:`EngineClient`.

``build_app(engine, settings, metrics)`` is what every serving role mounts (the monolithic server, the decode
service, the router). Every failure leaves as OpenAI's error body with the right status; the body-size limit and
the caller's credentials are enforced by :mod:`.guard` before anything is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.engine.frontend.tokenizer import off_loop
from pdserve.engine.sampling_params import is_valid_text
from pdserve.services.api.endpoints import add_endpoints
from pdserve.services.api.engine_client import EngineClient
from pdserve.services.api.errors import ApiError, bad_request, from_exception
from pdserve.services.api.guard import GuardMiddleware, parse_json_body
from pdserve.services.api.metrics import CONTENT_TYPE, ServingMetrics
from pdserve.services.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest)
from pdserve.services.api.serving_chat import ChatServing, render_chat_async
from pdserve.services.api.serving_completion import CompletionServing
from pdserve.services.api.settings import ServerSettings

logger = logging.getLogger(__name__)

class _EventStream(StreamingResponse):
    """SSE response that always closes its engine streams, even if the body never started."""

    def __init__(self, events: Any) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    data = parse_json_body(await request.body())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """The first problem pydantic found, naming the field."""
    first = exc.errors()[0]
    # Drop union-member tags ("str", "list[int]") pydantic adds to the location.
    loc = [str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p in ("str", "int",
                                                                                                 "float", "bool")))]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":  # a key a nested object does not know (fields.py: none ignored)
        return bad_request(f"{param}: unknown field, not supported by this server", param=param,
                           code="unknown_field")
    return bad_request(f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param=param)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work`` unless the client goes away first; then cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Wait for the cancellation to land: the work's own clean-up (closing its engine streams, which
            # aborts the request and frees its KV blocks) runs now, and its outcome is read below, never left
            # pending (reading a pending task's result raised InvalidStateError into the log).
            await asyncio.wait({task})
    if task.cancelled():
        return None  # nobody is listening any more
    return task.result()


def _no_native_telemetry() -> dict[str, Any]:
    """FastAPI >= 0.165 traces requests itself once a tracer provider is installed (and logs rejected bodies with
    their values). pdserve's own spans (:mod:`.tracing`) cover the API; switch FastAPI's off where it exists."""
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}


def build_app(engine: EngineClient, settings: ServerSettings, metrics: ServingMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``: OpenAI endpoints, health, metrics and the tokenizer endpoints."""
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None, **_no_native_telemetry())
    completion = CompletionServing(engine, settings)
    chat = ChatServing(engine, settings)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail))  # unknown path, wrong method
        return JSONResponse(err.body(), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc, settings.retry_after_s)
        if err.status >= 500 and err.status != 503:
            logger.exception("request failed: %s %s", request.method, request.url.path)
        return JSONResponse(err.body(), err.status, headers=err.headers())

    async def _serve(request: Request, result: Any) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        return _EventStream(result)

    async def _run(request: Request, create: Callable[[Any], Awaitable[Any]], body: Any,
                   error_body: Callable[[ApiError], dict] = ApiError.body) -> Response:
        try:
            result = await _until_disconnect(request, create(body))
        except Exception as exc:  # bad input, full queue, dead engine, timeout: all leave as API errors
            err = from_exception(exc, settings.retry_after_s)
            if err.status == 500:
                logger.exception("request failed: %s %s", request.method, request.url.path)
            return JSONResponse(error_body(err), err.status, headers=err.headers())
        if result is None:
            return Response(status_code=499)  # client closed the request; nothing will read this
        return await _serve(request, result)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _run(request, completion.create, await _parse(request, CompletionRequest))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _run(request, chat.create, await _parse(request, ChatCompletionRequest))

    add_endpoints(app, engine, settings, _run, _parse)  # responses, messages, embeddings, version, ...

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "pdserve", "root": engine.model_name,
             "max_model_len": engine.max_model_len} for name in settings.served_model_names]}

    @app.get("/health")
    async def health() -> Response:
        if engine.is_ready:
            return JSONResponse({"status": "ok"})
        dead = engine.dead_error
        if dead:  # the reason goes to the log, not to whoever asks (it may name paths, addresses, internals)
            logger.warning("health check: the engine is dead: %r", dead)
        err = ApiError(503, "the engine is not serving" if dead else "the engine is starting",
                       retry_after=settings.retry_after_s, code="engine_dead" if dead else "engine_not_ready")
        return JSONResponse(err.body(), 503, headers=err.headers())

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if metrics is None:
            return Response(b"", media_type=CONTENT_TYPE)
        body, content_type = metrics.render_for(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    async def tokenizer_call(request: Request, model: type[BaseModel], param: str) -> tuple[Any, Any]:
        """/tokenize's and /detokenize's start: the parsed body (its model checked) and the engine's tokenizer; a
        400 naming ``param`` where the model has none."""
        req = await _parse(request, model)
        completion.check_model(req.model)
        tok = engine.tokenizer
        if tok is None:
            raise bad_request("this model has no tokenizer", param=param)
        return req, tok

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req, tok = await tokenizer_call(request, TokenizeRequest, "prompt")
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            tokens = (await render_chat_async(tok, req.messages, req.add_generation_prompt,
                                              chat_template=settings.chat_template)).token_ids
        else:
            if not is_valid_text(req.prompt):
                raise bad_request("the prompt is not valid Unicode text (it holds a lone surrogate)", param="prompt")
            tokens = await off_loop(lambda: list(tok(req.prompt, add_special_tokens=req.add_special_tokens)
                                                 .input_ids), size=len(req.prompt))
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req, tok = await tokenizer_call(request, DetokenizeRequest, "tokens")
        vocab = len(tok)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    return app


def with_guard(app: Any, settings: ServerSettings) -> Any:
    """The ASGI application to serve: ``app`` behind the credentials, size and time guard (:mod:`.guard`), inside
    the tracing span (:mod:`.tracing`) and, outermost, the request's arrival mark and opt-in timeline
    (:mod:`.request_timing`)."""
    from pdserve.services.api.request_timing import TimingMiddleware
    from pdserve.services.api.tracing import TracingMiddleware

    return TimingMiddleware(TracingMiddleware(GuardMiddleware(app, settings)))
