"""``pdserve sim-check``: replay one trace through the real engine and through the simulator, compare TTFT and ITL.

    pdserve sim-check --model smollm2-135m-instruct --trace "duration=8,rate=1,in=64:192,out=8:24"
    pdserve sim-check --model llama-3.1-8b --load-format dummy --profile llama-3.1-8b_h100 \\
        --trace "duration=30,rate=8,in=200:2000,out=50:300"

With ``--profile fit`` (the default) the cost profile is fitted on this machine first, from a calibration
workload run through the same engine (see :mod:`pdserve.sim.fidelity`); with ``--profile fit-run`` it is fitted
to the steps of the measured replay itself (what the CPU test does: on a loaded machine the steps' cost drifts
between a calibration and the run); with a shipped profile's name, that profile is what is checked. The
scheduler limits (``--max-num-seqs``, ``--max-num-batched-tokens``) and the KV pool
are the real engine's in both runs.
"""

from __future__ import annotations

import argparse
import json

from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("check")
    g.add_argument("--trace", default="duration=8,rate=1,in=64:192,out=8:24",
                   help="phases 'key=value,...;...' as for pdserve sim (see pdserve/sim/workload.py)")
    g.add_argument("--trace-seed", type=int, default=1)
    g.add_argument("--profile", default="fit",
                   help="'fit': fit one on this machine first; 'fit-run': fit it to the measured run's own steps; "
                        "or a shipped profile's name / a JSON file")
    g.add_argument("--json-out", default=None, help="write the results here as JSON")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pdserve.engine.llm import LLM
    from pdserve.sim import fidelity
    from pdserve.sim.cost_model import load_profile
    from pdserve.sim.workload import generate, parse_trace

    llm = LLM(**engine_kwargs(args))
    core = llm.engine.core
    config = llm.config
    hf = config.model.hf_config
    manager = core.scheduler.kv_cache_manager
    trace = generate(parse_trace(args.trace), vocab_size=hf.vocab_size, seed=args.trace_seed)
    if not trace:
        raise SystemExit("the trace has no request: raise its rate or duration")
    real = None
    if args.profile in ("fit", "fit-run"):
        if args.profile == "fit":
            stats = fidelity.calibrate(core, hf.vocab_size)
        else:
            real, stats = fidelity.replay_real_with_steps(core, trace)
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        # Only KV transfers read it (none between the sim's one colocated pod): the cache's element size.
        itemsize = core.runner.kv_caches[0].element_size() if core.runner.kv_caches else 2
        kv_bytes = hf.num_hidden_layers * hf.num_key_value_heads * head_dim * 2 * itemsize
        profile = fidelity.fit_profile(stats, name="fitted", model=args.model, gpu=str(core.runner.device),
                                       kv_bytes_per_token=kv_bytes, num_blocks=manager.num_blocks,
                                       block_size=manager.block_size)
    else:
        profile = load_profile(args.profile)
    if real is None:
        real = fidelity.replay_real(core, trace)
    sched = config.scheduler
    sim = fidelity.replay_sim(profile, trace, model=args.model, max_num_seqs=sched.max_num_seqs,
                              max_num_batched_tokens=sched.max_num_batched_tokens,
                              max_model_len=config.model.max_model_len)
    result = {"requests": len(trace), "profile": profile.__dict__,
              "measured": {"mean_ttft_s": real.mean_ttft_s, "mean_itl_s": real.mean_itl_s},
              "simulated": {"mean_ttft_s": sim.mean_ttft_s, "mean_itl_s": sim.mean_itl_s},
              "ttft_error": fidelity.relative_error(sim.mean_ttft_s, real.mean_ttft_s),
              "itl_error": fidelity.relative_error(sim.mean_itl_s, real.mean_itl_s)}
    print(f"profile {profile.name}: base {profile.base_ms:.3f} ms, {profile.per_token_ms:.5f} ms/token, "
          f"{profile.per_context_ms:.3g} ms/context token")
    print(f"{len(trace)} requests   measured   simulated   error")
    for key, label in (("mean_ttft_s", "mean TTFT"), ("mean_itl_s", "mean ITL")):
        m, s = result["measured"][key], result["simulated"][key]
        print(f"{label:>12} {m * 1e3:9.1f} ms {s * 1e3:9.1f} ms {abs(s - m) / m:7.1%}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
