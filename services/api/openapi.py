"""The HTTP API's OpenAPI document, with the request bodies the routes parse themselves.

The routes read their bodies by hand (:func:`.guard.parse_json_body`, so that every bad body gets OpenAI's error
shape), which leaves FastAPI's generated schema without request bodies. :func:`openapi_schema` adds them from the
same pydantic models the routes validate with, so tools (the schemathesis fuzz test in CI, client generators) see
exactly what the server accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pdserve.services.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest)
from pdserve.services.api.responses_protocol import ResponsesRequest
from pdserve.services.api.serving_embeddings import EmbeddingsRequest
from pdserve.services.api.serving_messages import MessagesRequest

# POST route -> the model its body is validated with.
REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/messages": MessagesRequest,
    "/v1/embeddings": EmbeddingsRequest,
}


def openapi_schema(app: Any) -> dict[str, Any]:
    """OpenAPI 3 document of ``app`` (a :func:`.app.build_app` app) with request bodies and bearer auth."""
    schema = dict(app.openapi())
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in REQUEST_BODIES.items():
        operation = schema["paths"].get(path, {}).get("post")
        if operation is None:
            continue
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"bearer": []}]
    return schema
