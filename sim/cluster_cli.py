"""``pdserve sim``: a simulated cluster in virtual time — N prefill and M decode pods, a trace, faults, and
optionally the operator's autoscaler — reporting TTFT/TPOT/ITL/E2E quantiles, SLO attainment, goodput, errors by
cause, answers checked and GPU-hours.

    pdserve sim --profile llama-3.1-8b_h100 --prefill 20 --decode 80 \\
        --trace "duration=120,rate=40,in=3000,out=50;duration=120,rate=40,in=200,out=600" \\
        --ttft-slo 2 --tpot-slo 0.05 [--autoscale --max-prefill 60 --max-decode 100 --gpu-budget 120] \\
        [--kv-fault-fail-rate 0.05 --kill-decode-every 60 --kv-fault-latency 0.2] [--output report.json]

``--prefill 0`` simulates colocated serving (``--decode`` pods serving both roles). See docs/autoscaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pdserve.sim.cost_model import available_profiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdserve.sim.engine_cli import add_fault_arguments

    g = parser.add_argument_group("cluster")
    g.add_argument("--profile", default="llama-3.1-8b_h100",
                   help=f"cost profile: {', '.join(available_profiles())}, or a JSON file")
    g.add_argument("--prefill", type=int, default=2, help="prefill pods (0: colocated pods serving both roles)")
    g.add_argument("--decode", type=int, default=2, help="decode pods (with --prefill 0: colocated pods)")
    g.add_argument("--trace", default="duration=60,rate=4,in=1024,out=128",
                   help="phases 'key=value,...;...' with duration, rate, in, out, burst, tenants, prefix "
                        "(see pdserve/sim/workload.py)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT objective in seconds")
    g.add_argument("--tpot-slo", type=float, default=0.05, help="per-request time per output token objective (s)")
    g.add_argument("--startup-s", type=float, default=30.0, help="seconds a new or replacement pod takes to be ready")
    g.add_argument("--output", default=None, help="write the JSON report here (default: stdout only)")
    f = parser.add_argument_group("faults")
    add_fault_arguments(f)
    f.add_argument("--kill-decode-every", type=float, default=0.0,
                   help="kill a random decode pod every this many seconds (0: never); a replacement starts")
    a = parser.add_argument_group("autoscaling (the operator's control law, operator/autoscaler.py)")
    a.add_argument("--autoscale", action="store_true", help="run the autoscaler (disaggregated pods only)")
    a.add_argument("--min-prefill", type=int, default=1)
    a.add_argument("--max-prefill", type=int, default=64)
    a.add_argument("--min-decode", type=int, default=1)
    a.add_argument("--max-decode", type=int, default=64)
    a.add_argument("--gpu-budget", type=int, default=None, help="total GPUs of both roles (one GPU a pod)")
    a.add_argument("--interval", type=float, default=15.0, help="seconds between decisions")
    a.add_argument("--scale-up-interval", type=float, default=None,
                   help="seconds between scale-up checks between two decisions (default: none)")
    a.add_argument("--scale-down-window", type=float, default=120.0)
    a.add_argument("--dry-run", action="store_true", help="decide and report, never change the pods")


def config_from_args(args: argparse.Namespace):  # -> ClusterConfig
    """``ValueError`` with a clear message for a configuration the simulator cannot run."""
    from pdserve.operator.autoscaler import AutoscalingPolicy
    from pdserve.sim.cluster import ClusterConfig
    from pdserve.sim.cost_model import load_profile
    from pdserve.sim.engine_cli import faults_from_args

    if args.prefill < 0 or args.decode < 1:
        raise ValueError("need --prefill >= 0 and --decode >= 1")
    faults = faults_from_args(args)
    if args.prefill == 0 and (faults != type(faults)() or args.kv_load_failure_policy != "recompute"):
        raise ValueError("KV fault flags act on KV loads: colocated pods (--prefill 0) load none")
    policy = None
    if args.autoscale:
        if args.prefill == 0:
            raise ValueError("--autoscale scales prefill and decode pods; it needs --prefill >= 1")
        policy = AutoscalingPolicy(ttft_target_s=args.ttft_slo, itl_target_s=args.tpot_slo,
                                   min_prefill=args.min_prefill, max_prefill=args.max_prefill,
                                   min_decode=args.min_decode, max_decode=args.max_decode,
                                   gpu_budget=args.gpu_budget, interval_s=args.interval,
                                   scale_up_interval_s=args.scale_up_interval,
                                   scale_down_window_s=args.scale_down_window, dry_run=args.dry_run,
                                   max_batch=args.max_num_seqs)
    elif args.dry_run or args.gpu_budget is not None:
        raise ValueError("--dry-run and --gpu-budget are autoscaler options: add --autoscale")
    return ClusterConfig(profile=load_profile(args.profile), prefill=args.prefill, decode=args.decode,
                         max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         faults=faults, load_failure_policy=args.kv_load_failure_policy,
                         kill_decode_every_s=args.kill_decode_every, startup_s=args.startup_s, autoscaling=policy,
                         seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from pdserve.sim.cluster import Cluster
    from pdserve.sim.report import summarize
    from pdserve.sim.workload import generate, parse_trace

    try:
        cfg = config_from_args(args)
        trace = generate(parse_trace(args.trace), seed=args.seed)
    except ValueError as exc:
        print(f"pdserve sim: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    cluster = Cluster(cfg)
    requests = cluster.run(trace)
    report = summarize(requests, cluster, args.ttft_slo, args.tpot_slo)
    report["trace"] = args.trace
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["decisions"] = [(round(t, 1), d.prefill, d.decode, d.budget_limited, d.colocate)
                           for t, d in cluster.decisions]
    text = json.dumps(report, indent=1)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    brief = {k: report[k] for k in ("requests", "ok", "wrong_answers", "errors", "slo_attainment", "goodput_rps",
                                    "gpu_hours", "ttft_s", "tpot_s", "wall_s")}
    print(json.dumps(brief, indent=1))
    return 0
