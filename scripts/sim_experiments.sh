#!/usr/bin/env bash
# The simulated results of docs/autoscaling.md: every number there comes from one of these commands.
#   scripts/sim_experiments.sh OUTDIR [autoscale|static|colocation|faults|scale|autoscale100|static100|autoscale100long|
#                                      static100long|colocation100]...
set -euo pipefail
out=${1:?usage: $0 OUTDIR [experiment...]}; shift
mkdir -p "$out"
PD=${PDSERVE:-pdserve}
# Prompt-heavy -> decode-heavy -> prompt-heavy, with 30 s ramps between (Llama-3.1-8B on H100).
SHIFT="duration=90,rate=20,in=4000,out=50;duration=30,rate=20,in=2000,out=500;duration=90,rate=20,in=200,out=1000;duration=30,rate=20,in=2000,out=500;duration=90,rate=20,in=4000,out=50"
SLO="--ttft-slo 1 --tpot-slo 0.012"
# The same shift at 20x the rate (400 req/s; 60 s phases and 20 s ramps to keep a run within minutes): 100+ pods.
SHIFT20="duration=60,rate=400,in=4000,out=50;duration=20,rate=400,in=2000,out=500;duration=60,rate=400,in=200,out=1000;duration=20,rate=400,in=2000,out=500;duration=60,rate=400,in=4000,out=50"
# SHIFT20 with 120 s phases and 30 s ramps: the same mixes, held twice as long (167,848 requests).
SHIFT20L="duration=120,rate=400,in=4000,out=50;duration=30,rate=400,in=2000,out=500;duration=120,rate=400,in=200,out=1000;duration=30,rate=400,in=2000,out=500;duration=120,rate=400,in=4000,out=50"
for exp in "${@:-autoscale static colocation faults scale}"; do
  case $exp in
    autoscale)
      $PD sim --prefill 3 --decode 1 --autoscale --min-prefill 1 --max-prefill 12 --max-decode 12 --gpu-budget 14 \
        --interval 5 --scale-up-interval 1 --scale-down-window 30 --startup-s 10 --trace "$SHIFT" $SLO \
        --output "$out/autoscale.json" ;;
    static)  # the static splits around the peak needs of each phase (fewer GPUs miss the SLOs in one phase)
      for pd in 2:2 3:1 3:2 2:3 4:2; do
        $PD sim --prefill ${pd%:*} --decode ${pd#*:} --trace "$SHIFT" $SLO --output "$out/static_${pd%:*}p${pd#*:}d.json"
      done ;;
    colocation)  # DistServe-style: goodput of P/D vs colocated at equal GPU count, short and long prompts
      for load in ${LOADS:-duration=120,in=2000,out=200,rate=24 duration=120,in=2000,out=200,rate=36 \
                   duration=120,in=100,out=200,rate=40 duration=40,in=100,out=200,rate=250}; do
        tag=$(echo "$load" | tr ',=' '__')
        $PD sim --prefill 2 --decode 2 --trace "$load" $SLO --output "$out/pd_$tag.json"
        $PD sim --prefill 0 --decode 4 --trace "$load" $SLO --output "$out/colo_$tag.json"
      done ;;
    faults)  # 5 % failed KV loads, a decode pod killed per minute, a slow connector (50 ms + 5 GB/s)
      $PD sim --prefill 2 --decode 4 --trace "duration=300,rate=10,in=1000,out=300" $SLO --kv-fault-fail-rate 0.05 \
        --kill-decode-every 60 --kv-fault-latency 0.05 --kv-bandwidth-gbps 5 --startup-s 20 \
        --output "$out/faults.json" ;;
    scale-autoscale)  # the autoscaler past 100 pods: a prompt-heavy load that triples, then falls back
      $PD sim --prefill 20 --decode 4 --autoscale --max-prefill 150 --max-decode 20 --gpu-budget 170 --interval 5 \
        --scale-down-window 30 --startup-s 10 \
        --trace "duration=40,rate=200,in=4000,out=10;duration=40,rate=600,in=4000,out=10;duration=40,rate=200,in=4000,out=10" \
        $SLO --output "$out/scale_autoscale.json" ;;
    autoscale100)  # acceptance 2 at 100+ pods: the autoscaler on SHIFT20
      nice $PD sim --prefill 50 --decode 8 --autoscale --min-prefill 1 --max-prefill 100 --max-decode 100 \
        --gpu-budget 140 --interval 5 --scale-up-interval 1 --scale-down-window 30 --startup-s 10 --trace "$SHIFT20" $SLO \
        --output "$out/autoscale100.json" ;;
    static100)  # the static splits around each phase's peak needs on SHIFT20
      for pd in ${SPLITS:-50:45 45:45 45:42 50:40}; do
        nice $PD sim --prefill ${pd%:*} --decode ${pd#*:} --trace "$SHIFT20" $SLO \
          --output "$out/static100_${pd%:*}p${pd#*:}d.json"
      done ;;
    autoscale100long)  # acceptance 2 at 100+ pods on SHIFT20L (the autoscale100 settings)
      nice $PD sim --prefill 50 --decode 8 --autoscale --min-prefill 1 --max-prefill 100 --max-decode 100 \
        --gpu-budget 140 --interval 5 --scale-up-interval 1 --scale-down-window 30 --startup-s 10 --trace "$SHIFT20L" \
        $SLO --output "$out/autoscale100long.json" ;;
    static100long)  # the static split that met 90 % on SHIFT20 with the fewest GPU-hours, on SHIFT20L
      for pd in ${SPLITS:-45:42}; do
        nice $PD sim --prefill ${pd%:*} --decode ${pd#*:} --trace "$SHIFT20L" $SLO \
          --output "$out/static100long_${pd%:*}p${pd#*:}d.json"
      done ;;
    colocation100)  # DistServe-style at 100 GPUs: 50 prefill + 50 decode vs 100 colocated, long prompts
      for load in ${LOADS100:-duration=30,in=2000,out=200,rate=600 duration=30,in=2000,out=200,rate=900}; do
        tag=$(echo "$load" | tr ',=' '__')
        nice $PD sim --prefill 50 --decode 50 --trace "$load" $SLO --output "$out/pd100_$tag.json"
        nice $PD sim --prefill 0 --decode 100 --trace "$load" $SLO --output "$out/colo100_$tag.json"
      done ;;
    gpu-check)  # docs/performance.md's 1,000-request ShareGPT-like run (54.7 req/s on an H100), all at once
      $PD sim --prefill 0 --decode 1 --trace "duration=0.01,rate=100000,in=30:400,out=30:370" \
        --ttft-slo 1000 --tpot-slo 1000 --output "$out/gpu_check.json" ;;  # goodput_rps = req/s
    scale)  # 120 pods in one simulation
      $PD sim --prefill 40 --decode 80 --trace "duration=30,rate=200,in=3000,out=20" $SLO --output "$out/scale120.json" ;;
  esac
done
