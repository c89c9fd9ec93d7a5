"""Errors of the async engine (the API layer maps them to HTTP and gRPC statuses)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine core process is gone (crashed, killed, or shut down); nothing more can be served."""


class EngineNotReadyError(RuntimeError):
    """The engine core is still loading."""


class QueueFullError(RuntimeError):
    """More sequences wait for their first scheduling than ``max_waiting`` allows; retry later."""


class RequestFailedError(RuntimeError):
    """The engine failed while serving this request (see :mod:`pdserve.engine.faults`): the request is aborted
    and its blocks freed; the engine serves on. Retrying the same request elsewhere would fail the same way."""
