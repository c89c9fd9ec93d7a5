#!/usr/bin/env bash
# The test suite. Without CUDA, Triton kernels run in the interpreter (tests/conftest.py) and tests marked gpu
# are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
