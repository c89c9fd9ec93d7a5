"""Sends one benchmark request to an OpenAI-compatible endpoint (streamed) and times it as a user would see it.

Time to first token is the arrival of the first chunk with text; inter-token latencies are the gaps between
later text chunks (servers that batch tokens into one chunk make fewer, longer gaps, as they appear to users).
Token counts come from the server's ``usage`` (``stream_options.include_usage``), falling back to chunk counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from pdserve.bench.datasets import BenchRequest


@dataclass
class RequestResult:
    """Timings (seconds) and sizes of one request; ``error`` is set when it failed."""

    success: bool
    start: float = 0.0  # time.perf_counter() at send, relative to the run's start
    sent_at: float = 0.0  # time.time() at send: wall clock, to match against server-side traces (PDSERVE_STEP_TRACE)
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    tenant: str | None = None
    # The server's per-request timeline (pdserve's opt-in x-pdserve-timing extension): seconds per phase, in the
    # timeline's order, and which of them make up the time to first token.
    phases: dict[str, float] = field(default_factory=dict)
    ttft_phases: list[str] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send requests. ``chat``: ``/v1/chat/completions`` instead of ``/v1/completions``."""

    base_url: str
    model: str
    chat: bool = False
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: tuple[tuple[str, Any], ...] = ()
    timing: bool = False  # ask a pdserve server for each request's timeline (x-pdserve-timing: 1)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ("/v1/chat/completions" if self.chat else "/v1/completions")

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.timing:
            headers["x-pdserve-timing"] = "1"
        return headers

    def body(self, req: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.expected_output_len, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": self.temperature}
        if self.chat:
            body["messages"] = req.chat_messages()
        else:
            body["prompt"] = req.completion_prompt()
        if self.ignore_eos:
            body["ignore_eos"] = True
        if req.tenant is not None:
            body["user"] = req.tenant  # lets a router keep a tenant's requests together
        body.update(dict(self.extra_body))
        return body


def _text_of(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(client: httpx.AsyncClient, endpoint: Endpoint, req: BenchRequest,
                       t0: float) -> RequestResult:
    """Send ``req`` and time it; never raises for a failed request (the result carries the error)."""
    result = RequestResult(success=False, tenant=req.tenant)
    start = time.perf_counter()
    result.start, result.sent_at = start - t0, time.time()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", endpoint.url, json=endpoint.body(req), headers=endpoint.headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                if "pdserve_timing" in chunk:
                    _take_timeline(result, chunk["pdserve_timing"])
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                if not _text_of(chunk, endpoint.chat):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    if chunks == 0:
        result.error = "no text in the response"
        return result
    result.output_tokens = result.output_tokens or chunks
    result.success = True
    return result


def _take_timeline(result: RequestResult, timing: dict[str, Any]) -> None:
    """Seconds per phase of a server's timeline (a phase that repeats, e.g. after a retry, is summed)."""
    for phase in timing.get("phases") or []:
        name = str(phase["phase"])
        result.phases[name] = result.phases.get(name, 0.0) + float(phase["seconds"])
        if phase.get("ttft") and name not in result.ttft_phases:
            result.ttft_phases.append(name)


async def served_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The first model the server lists (``GET /v1/models``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url} lists no models")
    return str(data[0]["id"])
