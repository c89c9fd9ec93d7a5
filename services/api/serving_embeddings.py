"""``POST /v1/embeddings``: pooled, L2-normalized hidden states from a ``--runner pooling`` server.

The engine client must have ``embed(prompts) -> vectors`` and ``hidden_size`` (the pooling engine,
:class:`pdserve.engine.pooling.async_pooler.AsyncPooler`); any other server answers with a 400 saying so.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from pdserve.engine.frontend.tokenizer import tokenize_async
from pdserve.services.api.conversation import refuse_unsupported
from pdserve.services.api.errors import ApiError, bad_request
from pdserve.services.api.serving_common import ServingBase


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``. ``input``: a string, a list of strings, token ids, or a list of token-id lists."""

    # extra="allow": undeclared fields are kept, so they can be refused by name.
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


class EmbeddingsServing(ServingBase):
    """Builds OpenAI embedding lists."""

    async def create(self, req: EmbeddingsRequest) -> dict[str, Any]:
        refuse_unsupported(req.model_extra, frozenset())
        self.check_model(req.model)
        embed = getattr(self.engine, "embed", None)
        if embed is None:
            raise bad_request("/v1/embeddings needs a pooling runner and this server (or deployment behind this "
                              "router) has none: it runs the generate runner. Serve embeddings with "
                              "`pdserve serve --runner pooling`", param="model", code="unsupported")
        hidden = self.engine.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise bad_request(f"dimensions must equal the model's hidden size ({hidden}): this server does not "
                              f"shorten embeddings, got {req.dimensions}", param="dimensions")
        items = self._items(req.input)
        prompts = []
        for item in items:
            try:
                prompts.append(await tokenize_async(self.engine.tokenize, item))
            except ValueError as exc:
                raise bad_request(str(exc), param="input") from None
        try:
            vectors = await self.with_timeout(embed(prompts))
        except ValueError as exc:
            raise ApiError(400, str(exc), param="input") from None
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        tokens = sum(len(p) for p in prompts)
        return {"object": "list", "data": data, "model": self.model_name(),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _items(self, value: Any) -> list[str | list[int]]:
        if isinstance(value, str):
            items: list[str | list[int]] = [value]
        elif not value:
            raise bad_request("input must not be empty", param="input")
        elif isinstance(value[0], int):
            items = [value]
        else:
            items = list(value)
        limit = self.settings.max_embedding_inputs
        if len(items) > limit:
            raise bad_request(f"at most {limit} inputs per request, got {len(items)}", param="input")
        if any(len(item) == 0 for item in items):
            raise bad_request("an input must not be empty", param="input")
        return items
