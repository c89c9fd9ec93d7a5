#!/usr/bin/env bash
# CPU per streamed token of the router and of the pod behind it, on any machine (no GPU): a simulated engine pod
# (`pdserve sim-engine`, role both) behind `pdserve router`, driven by `bench serve` with 64 concurrent streams of
# 200 tokens (192 requests). Prints each process's CPU time (user + system) over the run divided by the tokens
# streamed. The numbers move with the machine's load, so compare versions in interleaved runs:
#
#   bash scripts/router_cpu.sh OUT_DIR [BASE_PORT]         # this tree (BASE_PORT, +1, +2 must be free)
#   PYTHONPATH=/tmp/old bash scripts/router_cpu.sh OUT_DIR  # another version, installed with pip --target /tmp/old
set -euo pipefail
OUT=${1:?usage: router_cpu.sh OUT_DIR [BASE_PORT]}
B=${2:-18100}
PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
mkdir -p "$OUT"
cd "$OUT"  # not the repository root: with -P and another PYTHONPATH, the tree must not shadow that version
PD=("$PY" -P -m pdserve.cli.main)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
wait_health() { for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
"${PD[@]}" sim-engine --model smollm2-135m-instruct --port "$B" --grpc-port $((B + 1)) --max-num-seqs 256 \
  > pod.log 2>&1 & pids+=($!)
POD=$!
wait_health "http://127.0.0.1:$B" || { tail pod.log; exit 1; }
"${PD[@]}" router --model smollm2-135m-instruct --port $((B + 2)) --both 127.0.0.1:$((B + 1)) > router.log 2>&1 &
pids+=($!)
ROUTER=$!
wait_health "http://127.0.0.1:$((B + 2))" || { tail router.log; exit 1; }
sleep 2  # the router's health checks mark the pod ready
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
r0=$(ticks $ROUTER); p0=$(ticks $POD)
"${PD[@]}" bench serve --base-url "http://127.0.0.1:$((B + 2))" --dataset random --random-input-len 64 \
  --random-output-len 200 --random-range-ratio 0 --num-prompts 192 --max-concurrency 64 --request-rate inf \
  --no-timing --disable-tqdm --result-dir res > bench.log 2>&1
r1=$(ticks $ROUTER); p1=$(ticks $POD)
tokens=$(awk '/Total generated tokens/ {print $NF}' bench.log)
hz=$(getconf CLK_TCK)
"$PY" -c "
r, p, n, hz = $r1 - $r0, $p1 - $p0, $tokens, $hz
print(f'router: {r / hz * 1e6 / n:.1f} us CPU per token; pod: {p / hz * 1e6 / n:.1f} us ({n} tokens)')"
grep -E "Output token throughput|Failed requests" bench.log
