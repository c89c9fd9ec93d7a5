"""Errors of the async engine (the API layer maps them to HTTP and gRPC statuses)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine core process is gone (crashed, killed, or shut down); nothing more can be served."""


class EngineNotReadyError(RuntimeError):
    """The engine core is still loading."""


class QueueFullError(RuntimeError):
    """More sequences wait for their first scheduling than ``max_waiting`` allows; retry later."""
