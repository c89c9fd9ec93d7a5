#!/usr/bin/env bash
# The test suite, after scripts/lint.sh (ruff, mypy). Without CUDA, Triton kernels run in the interpreter (tests/conftest.py) and tests marked gpu
# are skipped. The Redis connector's tests start a real redis-server (Debian's package), installed here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # Tests start their own server on a free port; the distribution's service is not needed.
    (service redis-server stop || true) >/dev/null 2>&1
  else
    echo "note: redis-server not found (install Debian's redis-server); the Redis tests will fail" >&2
  fi
fi
# Lint and type check first: a contract that drifted fails here in seconds, not in a test minutes later.
bash scripts/lint.sh
exec .venv/bin/python -P -m pytest -q "$@"
