#!/usr/bin/env bash
# Static checks, run by scripts/test.sh before the tests (configuration in pyproject.toml):
#   ruff  - pyflakes, pycodestyle, bugbear over the whole tree
#   mypy  - the contracts several parts share: engine core, EngineClient (and tests/static/contracts.py, where
#           its implementations must conform), the KV connector halves, the router plugins
# mypy reads packages from folders, and pdserve's folders sit at the repository root under other names
# (pyproject's package-dir). build/typecheck/pdserve/ is a tree of symbolic links that mirrors that mapping,
# rebuilt on every run; nothing imports from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

"$PY" -P -m ruff check --quiet .

tree=build/typecheck/pdserve
rm -rf build/typecheck && mkdir -p "$tree"
ln -s ../../../pdserve/__init__.py "$tree/__init__.py"
ln -s ../../../pdserve/cli "$tree/cli"
for folder in engine kernels services operator proto bench sim; do ln -s "../../../$folder" "$tree/$folder"; done

# Add a contract here when it joins the checked set (a file or a package folder, through the tree above).
"$PY" -P -m mypy --python-executable "$PY" \
  "$tree/engine/core" \
  "$tree/services/api/engine_client.py" \
  "$tree/engine/kv_transfer/base.py" \
  "$tree/services/router/plugins" \
  tests/static/contracts.py
