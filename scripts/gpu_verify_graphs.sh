#!/usr/bin/env bash
# Verify-step CUDA graphs (docs/speculative-decoding.md) on one GPU, in about 4 minutes: the GPU tests, then the
# Llama-3.1-8B-shape oracle benchmark at batch 1 (k = 4; 100/50/0 % acceptance), the same with verify graphs off
# (PDSERVE_VERIFY_CUDA_GRAPHS=0, the A/B), and batch 64 with adaptive k. Each benchmark's baseline row is the same
# engine without speculation (its requests opt out).
# Usage (repository root, CUDA machine, pdserve installed): bash scripts/gpu_verify_graphs.sh [RESULT_DIR]
# STEPS="tests b1" runs only the named steps (tests b1 b1_eager b64 b64_off fp32_kernels fp32_b1).
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-${OUT:-bench-results}}
source scripts/gpu_common.sh  # RES made, PY set, pdserve installed, a CUDA device seen
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
PD="$PY -P -m pdserve.cli.main"
status=0
step() {
  local name=$1 limit=$2; shift 2
  [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  grep -v -E "Warning|warn\(" "$RES/$name.log" | tail -40
  [[ $rc == 0 ]] || { echo "=== $name FAILED (exit $rc; 124 = timed out after ${limit}s); log: $RES/$name.log"; status=1; }
}
BENCH=(bench latency --model llama-3.1-8b --load-format dummy --input-len 128 --output-len 128 --iters 2
       --max-num-seqs 64 --max-model-len 1024)
SPEC='{"method": "oracle", "num_speculative_tokens": 4}'

step tests 150 "$PY" -P -m pytest -q -x -p no:cacheprovider tests/engine/worker/test_gpu_verify_graphs.py \
    tests/engine/worker/test_verify_graphs.py tests/kernels/test_attention.py -k "verify or Verify"
step b1 120 $PD "${BENCH[@]}" --batch-size 1 --speculative-config "$SPEC" --oracle-acceptance 1.0,0.5,0.0 \
    --json-out "$RES/spec_verify_graphs_b1.json"
PDSERVE_VERIFY_CUDA_GRAPHS=0 step b1_eager 90 $PD "${BENCH[@]}" --batch-size 1 --speculative-config "$SPEC" \
    --oracle-acceptance 1.0 --json-out "$RES/spec_verify_eager_b1.json"
step b64 120 $PD "${BENCH[@]}" --batch-size 64 --speculative-config "$SPEC" --oracle-acceptance 1.0,0.0 \
    --json-out "$RES/spec_verify_graphs_b64.json"
# Batch 64, adaptive k against speculation off in one process (--spec-baseline off: the baseline run detaches the
# speculative decoder): adaptive k proposes nothing there, so the step is the plain one and must not be slower.
step b64_off 150 $PD "${BENCH[@]}" --output-len 256 --iters 5 --batch-size 64 --spec-baseline off \
    --speculative-config '{"method": "oracle", "num_speculative_tokens": 4, "oracle_forced": true}' \
    --oracle-acceptance 1.0,0.0 --json-out "$RES/spec_b64_adaptive_vs_off.json"
# Float32 Llama-3.1-8B shapes (tile shapes fitted to the shared memory, kernels/smem.py): the kernel test, then the
# batch-1 sweep in float32, where the plain oracle needs no forcing (outputs equal: greedy = 100 %).
step fp32_kernels 120 "$PY" -P -m pytest -q -x -p no:cacheprovider tests/kernels/test_smem_configs.py
step fp32_b1 240 $PD "${BENCH[@]}" --output-len 64 --dtype float32 --batch-size 1 --speculative-config "$SPEC" \
    --oracle-acceptance 1.0,0.0 --json-out "$RES/spec_fp32_b1.json"
exit $status
