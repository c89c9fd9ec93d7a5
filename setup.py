"""Package discovery for the pdserve namespace (metadata and the folder mapping live in pyproject.toml).

Every folder under the mapped roots that holds an ``__init__.py`` becomes a ``pdserve.*`` package, so new
sub-packages need no edit here. Only ordinary packages are installed: a folder of Python files without an
``__init__.py`` is an error, not a namespace package that tools would have to guess.
"""

import os

from setuptools import setup

# Repository folder -> import name; the same mapping as [tool.setuptools] package-dir in pyproject.toml.
ROOTS = {"pdserve": "pdserve", "engine": "pdserve.engine", "kernels": "pdserve.kernels",
         "services": "pdserve.services", "operator": "pdserve.operator", "proto": "pdserve.proto",
         "bench": "pdserve.bench", "sim": "pdserve.sim"}


def find_packages() -> list[str]:
    packages = []
    for folder, name in ROOTS.items():
        if not os.path.isdir(folder):
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            if "__init__.py" in filenames:
                packages.append(name + dirpath[len(folder):].replace(os.sep, "."))
            elif any(f.endswith(".py") for f in filenames):
                raise SystemExit(f"setup.py: {dirpath} holds Python files but no __init__.py")
    return packages


setup(packages=find_packages())
