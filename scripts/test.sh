#!/usr/bin/env bash
# The test suite: CPU tests (Triton kernels run in the interpreter); GPU tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q "$@"
