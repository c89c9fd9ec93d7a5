"""The wire protocol between the API process (client) and the engine-core process.

Two ZeroMQ PUSH/PULL pipes carry msgpack frames (msgspec): requests go in, one message per engine step comes
out. The engine's own dataclasses (:class:`EngineCoreRequest`, :class:`EngineCoreOutput`, :class:`SchedulerStats`)
travel as they are, so the core process runs exactly the code that the offline engine runs.
"""

from __future__ import annotations

import msgspec

from pdserve.engine.core.sched_output import SchedulerStats
from pdserve.engine.engine_core import EngineCoreRequest
from pdserve.engine.outputs import EngineCoreOutput

# ----------------------------------------------------------------------------------------- client -> core


class AddRequests(msgspec.Struct, tag="add", array_like=True):
    """New sequences (already tokenized and validated by the front end)."""

    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    """Client gone, timeout or error: stop these sequences and free their blocks."""

    request_ids: list[str]


class FinishRequests(msgspec.Struct, tag="finish", array_like=True):
    """The front end found a stop string: the sequences end as ``stop`` (not ``abort``)."""

    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """Leave the busy loop and exit cleanly."""


class ResetPrefixCache(msgspec.Struct, tag="reset_prefix_cache", array_like=True):
    """Forget every cached prefix block; the core answers with a :class:`ResetPrefixCacheDone` of this ``token``."""

    token: int


ClientMessage = AddRequests | AbortRequests | FinishRequests | Shutdown | ResetPrefixCache

# ----------------------------------------------------------------------------------------- core -> client


class ReadyMessage(msgspec.Struct, tag="ready", array_like=True):
    """Sent once, after the model is loaded: what the front end needs to validate requests on its own."""

    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int


class StepMessage(msgspec.Struct, tag="step", array_like=True):
    """What one pass of the busy loop produced.

    ``scheduled`` names sequences whose first chunk was scheduled in this pass, with the time (``time.time()``)
    it was scheduled: queue time ends there and prefill time starts. ``rejected`` lists sequences the core
    refused at ``add_request`` (a race the front end could not see, e.g. a duplicate id), with the reason.
    ``num_step_tokens`` is how many tokens the model computed in this pass (0 when no step ran).
    """

    timestamp: float
    outputs: list[EngineCoreOutput]
    scheduled: list[tuple[str, float]]
    rejected: list[tuple[str, str]]
    stats: SchedulerStats
    num_step_tokens: int


class FatalMessage(msgspec.Struct, tag="fatal", array_like=True):
    """The core failed (at start-up or in a step) and is exiting; every pending request must be failed."""

    message: str
    traceback: str


class ResetPrefixCacheDone(msgspec.Struct, tag="reset_prefix_cache_done", array_like=True):
    """The outcome of a :class:`ResetPrefixCache`: ``ok`` is false when blocks were in use (nothing was reset)."""

    token: int
    ok: bool


CoreMessage = ReadyMessage | StepMessage | FatalMessage | ResetPrefixCacheDone


def client_encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def core_decoder() -> msgspec.msgpack.Decoder:
    """Decodes what the client sends; the core owns one."""
    return msgspec.msgpack.Decoder(ClientMessage)


def client_decoder() -> msgspec.msgpack.Decoder:
    """Decodes what the core sends; the client owns one."""
    return msgspec.msgpack.Decoder(CoreMessage)
