"""Run the operator: kopf settings, peering (leader election) and the coroutine both the CLI and the tests use."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading

import kopf

from pdserve.operator import constants as c
from pdserve.operator.handlers import OperatorOptions, build_registry

# What kopf accepts as a stop or ready flag.
Flag = asyncio.Future | asyncio.Event | concurrent.futures.Future | threading.Event


def make_settings() -> kopf.OperatorSettings:
    """kopf settings: its bookkeeping under our own annotation prefix, and only warnings posted as Events."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.GROUP, key="last-handled-configuration")
    # Explicit kopf.info/kopf.warn calls still post Events; routine handler logs stay in the operator's log.
    settings.posting.level = logging.WARNING
    return settings


def peering_priority(options: OperatorOptions) -> int:
    """kopf pauses every replica that sees a live peer of higher *or equal* priority, so replicas must differ:
    a random priority makes the highest one the leader and the others hot standbys."""
    return options.priority if options.priority is not None else random.SystemRandom().randint(1, 2**31 - 1)


async def run_operator(options: OperatorOptions, *, stop_flag: Flag | None = None,
                       ready_flag: Flag | None = None) -> None:
    """Run until ``stop_flag`` is set (or a signal arrives, when running as the main program)."""
    liveness = f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None
    await kopf.operator(
        registry=build_registry(options), settings=make_settings(), memo=kopf.Memo(),
        clusterwide=not options.namespaces, namespaces=list(options.namespaces),
        standalone=options.peering is None, peering_name=options.peering, priority=peering_priority(options),
        liveness_endpoint=liveness, stop_flag=stop_flag, ready_flag=ready_flag)
