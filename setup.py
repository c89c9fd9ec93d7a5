"""Package discovery for the pdserve namespace (metadata lives in pyproject.toml).

Every sub-folder of engine/, kernels/, services/, operator/ and proto/ that holds Python code becomes a
``pdserve.*`` package, so new sub-packages need no edit here.
"""

import os

from setuptools import setup

ROOTS = {"pdserve": "pdserve", "engine": "pdserve.engine", "kernels": "pdserve.kernels",
         "services": "pdserve.services", "operator": "pdserve.operator", "proto": "pdserve.proto"}


def find_packages() -> list[str]:
    packages = []
    for folder, name in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if any(f.endswith(".py") for f in filenames):
                packages.append(name + dirpath[len(folder):].replace(os.sep, "."))
    return packages


setup(packages=find_packages())
