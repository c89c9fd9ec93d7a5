"""The scheduler halves of the connectors run in the engine core's scheduler, which never loads torch (nor grpc,
nor a redis client): importing them in a fresh interpreter must leave those out of ``sys.modules``."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCHEDULER_HALVES = [
    "pdserve.engine.kv_transfer.base",
    "pdserve.engine.kv_transfer.registry",
    "pdserve.engine.kv_transfer.connector_scheduler",
    "pdserve.engine.kv_transfer.stores.scheduler",
    "pdserve.engine.kv_transfer.grpc.scheduler",
    "pdserve.engine.kv_transfer.grpc.transfers",
]


@pytest.mark.parametrize("module", SCHEDULER_HALVES)
def test_scheduler_half_imports_without_torch_grpc_or_redis(module):
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('torch', 'grpc', 'redis', 'numpy') if m in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"
