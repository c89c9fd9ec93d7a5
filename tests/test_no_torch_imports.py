"""Parts that must run without torch (docs/architecture.md): the scheduler side of the engine and the router.

Each entry of ``TORCH_FREE`` is a module or a package; a package stands for every module below it. A fresh
interpreter imports them all and must not have loaded torch (nor numpy, which drags in megabytes the router and the
scheduler do not need). Add a module here when it joins the torch-free side, e.g. a connector's scheduler half.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = (
    "pdserve.engine.core",  # block hash, block pool, KV cache manager, scheduler
    "pdserve.services.router",  # the router and its plugins
)
FORBIDDEN = ("torch", "numpy")

_PROBE = """
import importlib, pkgutil, sys
names = []
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    names.append(name)
    if hasattr(module, "__path__"):
        for info in pkgutil.walk_packages(module.__path__, name + "."):
            importlib.import_module(info.name)
            names.append(info.name)
print(" ".join(names))
print(" ".join(m for m in %r if m in sys.modules) or "-")
""" % (FORBIDDEN,)


@pytest.mark.parametrize("name", TORCH_FREE)
def test_module_imports_without_torch(name: str) -> None:
    result = subprocess.run([sys.executable, "-I", "-c", _PROBE, name], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported, loaded = result.stdout.splitlines()
    assert name in imported.split()
    assert loaded == "-", f"importing {name} loaded {loaded}"


def test_the_probe_notices_torch() -> None:
    # The probe itself can fail: a module that imports torch is reported.
    result = subprocess.run([sys.executable, "-I", "-c", _PROBE, "pdserve.engine.sampler"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[0] == "torch"
