"""Checked by mypy (scripts/lint.sh), never run: every implementation of a shared contract conforms to it.

A Protocol is only compared with a class where the class is used as one. The servers build their apps from
untyped values, so these assignments are the place where a drifted signature (a missing keyword, a changed return
type) fails the type check instead of a request at run time. Add a line when a new implementation appears.
"""

from __future__ import annotations

from pdserve.engine.async_engine.client import AsyncLLM
from pdserve.engine.async_engine.dp_client import DataParallelLLM
from pdserve.engine.pooling.async_pooler import AsyncPooler
from pdserve.services.api.engine_client import EngineClient
from pdserve.services.router.engine import RouterEngine


def engine_clients(local: AsyncLLM, router: RouterEngine, data_parallel: DataParallelLLM,
                   pooler: AsyncPooler) -> list[EngineClient]:
    """The monolithic/pod engine, the router's engine, the data-parallel engine and the pooling engine all serve
    the HTTP and gRPC front ends."""
    return [local, router, data_parallel, pooler]
