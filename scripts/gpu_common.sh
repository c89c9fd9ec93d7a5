# The shared start of the scripts/gpu_*.sh runs, sourced from the repository root with RES (the result folder) set:
# makes RES, unbuffers Python's output, sets PY (PYTHON, default python3), installs pdserve editable where it does
# not import, and checks that torch sees a CUDA device. On a failure it says why and exits the calling script.
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
"$PY" -P -c "import pdserve.engine" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "pdserve does not import with $PY and the editable install failed" >&2; exit 1; }
"$PY" -P -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA device visible to torch" >&2; exit 1; }
