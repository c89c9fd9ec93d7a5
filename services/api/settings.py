"""Front-end settings of one server: names, auth and the limits that keep every request bounded."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS
from pdserve.engine.security import ClusterSecret


@dataclass(frozen=True)
class ServerSettings:
    """Built once by the CLI (or a test); the app and the gRPC server only read it.

    ``served_model_names``: names clients may use in ``model`` (the first one is reported back).
    ``api_key`` / ``cluster_secret``: when either is set, HTTP requests under ``/v1``, ``/router`` and the tokenizer
    endpoints and every gRPC call but the health check need ``Authorization: Bearer <key>`` or a call token signed
    with the secret (``x-pdserve-auth``, what the router sends); see :mod:`.auth`. ``request_timeout_s``: a request
    still running after this long is aborted (0: no limit). ``header_timeout_s`` / ``body_timeout_s``: how long a
    client may take to send a request's headers / its whole body before the connection is closed with a 408
    (0: no limit). ``max_concurrent_rpcs``: gRPC calls served at once; more get RESOURCE_EXHAUSTED (0: no limit).
    ``max_concurrent_requests``: HTTP API requests (``/v1``, tokenizer) served at once; more get 429 (0: no
    limit) -- the router's bound, which has no waiting queue of its own. ``chat_template``: a Jinja chat template
    that replaces the tokenizer's (None: the tokenizer's). ``reasoning_parser``: how chat answers split into
    ``reasoning_content`` and ``content`` (:mod:`.reasoning`; None: not split).
    """

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    cluster_secret: ClusterSecret | None = None
    max_body_bytes: int = 4 << 20
    max_prompts_per_request: int = 32  # a completions "prompt" may be a batch
    max_messages: int = 512
    max_n: int = MAX_N
    max_logprobs: int = MAX_LOGPROBS
    max_stop: int = MAX_STOP_STRINGS
    max_tokens_limit: int | None = None  # cap on max_tokens besides the context (None: the context only)
    request_timeout_s: float = 0.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_concurrent_rpcs: int = 256
    max_concurrent_requests: int = 1024
    retry_after_s: int = 1
    chat_template: str | None = None
    reasoning_parser: str | None = None
    max_embedding_inputs: int = 2048  # inputs of one /v1/embeddings request
    # Responses kept for ``previous_response_id`` (an LRU; 0 keeps none), see services/api/response_store.py.
    responses_store_size: int = 1024

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
