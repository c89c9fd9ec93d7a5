#!/usr/bin/env bash
# The GPU figures of docs/performance.md, in one go: every command below is a `pdserve bench ...` anyone can rerun.
# Usage (from the repository root on a CUDA machine, after `pip install --no-deps --no-build-isolation -e .`):
#   bash scripts/gpu_bench.sh [RESULT_DIR]
# STEPS="llama8b_batch1 qwen06b_256" runs only the named steps (default: all).
# Random weights in the exact shapes of the named models (no download needed). Each step is time-boxed so one
# slow step cannot starve the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-${OUT:-bench-results}}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
python3 -P -c "import pdserve.engine" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || { echo "pdserve is not installed and the editable install failed" >&2; exit 1; }
# -P: the repository root (the working directory) must not shadow installed packages (pyproject.toml says why).
PD="python3 -P -m pdserve.cli.main"
step() {
  local name=$1 limit=$2; shift 2
  [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name: $*"; timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee "$RES/$name.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
step llama8b_batch1 170 $PD bench latency --model llama-3.1-8b --load-format dummy --input-len 128 --output-len 256 \
    --iters 3 --peer hf --json-out "$RES/llama8b_batch1.json"
step llama8b_prefill4k 150 $PD bench latency --model llama-3.1-8b --load-format dummy --input-len 4096 --output-len 16 \
    --iters 3 --peer hf --json-out "$RES/llama8b_prefill4k.json"
step llama8b_decode_b64 80 $PD bench decode-profile --model llama-3.1-8b --load-format dummy \
    --batch-sizes 1,64 --context 1024 --steps 48
step qwen06b_256 300 $PD bench throughput --model qwen3-0.6b --load-format dummy --num-prompts 256 \
    --input-len 100:1024 --output-len 100:1024 --max-num-seqs 256 --max-num-batched-tokens 8192 --peer hf \
    --json-out "$RES/qwen06b_256.json"
step qwen06b_256_noprefix 60 $PD bench throughput --model qwen3-0.6b --load-format dummy --num-prompts 256 \
    --input-len 100:1024 --output-len 100:1024 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --no-enable-prefix-caching --json-out "$RES/qwen06b_256_noprefix.json"
step llama8b_sharegpt_like 150 $PD bench throughput --model llama-3.1-8b --load-format dummy --num-prompts 1000 \
    --input-len 30:400 --output-len 30:370 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --json-out "$RES/llama8b_sharegpt_like.json"
# Speculative decoding (docs/speculative-decoding.md): the oracle replays the baseline's outputs at 100/50/0 %
# acceptance on one engine; batch 64 shows adaptive k switching speculation off (never slower).
step spec_llama8b_b1 300 $PD bench latency --model llama-3.1-8b --load-format dummy --input-len 128 --output-len 256 \
    --iters 3 --batch-size 1 --speculative-config '{"method": "oracle", "num_speculative_tokens": 4}' \
    --oracle-acceptance 1.0,0.5,0.0 --json-out "$RES/spec_llama8b_b1.json"
step spec_llama8b_b64 300 $PD bench latency --model llama-3.1-8b --load-format dummy --input-len 128 --output-len 256 \
    --iters 3 --batch-size 64 --speculative-config '{"method": "oracle", "num_speculative_tokens": 4}' \
    --oracle-acceptance 1.0,0.0 --json-out "$RES/spec_llama8b_b64.json"
# The n-gram proposer on the bundled model, on a copy-heavy prompt (a list whose continuation repeats its pattern).
COPY_PROMPT=$(python3 -c "print(' '.join(f'Fact {i}: the number {i} is {\"even\" if i % 2 == 0 else \"odd\"}.' for i in range(40)))")
step spec_ngram_smollm2 200 $PD bench latency --model smollm2-135m-instruct --max-model-len 2048 --output-len 128 \
    --iters 3 --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}' --prompt "$COPY_PROMPT" \
    --json-out "$RES/spec_ngram_smollm2.json"
# The trained EAGLE head of the bundled model (once scripts/train_eagle_head.py has written it), on a chat question.
if [[ -f engine/spec_decode/heads/smollm2-135m-eagle/model.safetensors ]]; then
  step spec_eagle_smollm2 200 $PD bench latency --model smollm2-135m-instruct --max-model-len 2048 --output-len 128 \
      --iters 3 --speculative-config '{"method": "eagle", "model": "smollm2-135m-eagle", "num_speculative_tokens": 3}' \
      --prompt "Explain how vaccines work in simple terms." --json-out "$RES/spec_eagle_smollm2.json"
fi
step kv_transfer 150 $PD bench kv-transfer --connector grpc-ipc,grpc,shared-fs --shape llama-3.1-8b --prompt-lens 4096 \
    --device cuda --model llama-3.1-8b --output "$RES/kv_transfer.json"
# Prefix caching's cost at a 0 % hit rate: with and without, interleaved, twice each (one run each is too noisy).
for rep in 1 2; do
  for mode in on off; do
    flag=""; [[ $mode == off ]] && flag="--no-enable-prefix-caching"
    step "prefix_${mode}_${rep}" 90 $PD bench throughput --model qwen3-0.6b --load-format dummy --num-prompts 256 \
        --input-len 100:1024 --output-len 100:1024 --max-num-seqs 256 --max-num-batched-tokens 8192 $flag \
        --json-out "$RES/prefix_${mode}_${rep}.json"
  done
done
