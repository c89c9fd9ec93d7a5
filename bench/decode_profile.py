"""Decode steps at a fixed batch and context, timed and profiled: where a decode step's time goes.

``pdserve bench decode-profile --model llama-3.1-8b --load-format dummy --batch-sizes 1,64
--context 1024`` prefills ``B`` prompts of ``context`` tokens, then runs pure-decode steps and reports, per
batch size, the median step time, tokens/s and the roofline share (weights + live KV bytes / step time /
copy bandwidth measured in the same run). ``--kernels`` adds torch.profiler's table of the GPU kernels of a few
steps; ``--host`` adds cProfile's top functions by own time (the Python work between kernels); ``--phases``
adds the wall time per step of each phase of the engine loop (the sampler's phase includes waiting for the GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import random
import statistics
import time

from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=1024, help="prompt length of every request")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per batch size")
    parser.add_argument("--kernels", action="store_true", help="print the GPU kernel table of a few steps")
    parser.add_argument("--host", action="store_true", help="print cProfile's top functions of the steps")
    parser.add_argument("--phases", action="store_true", help="print the wall time of each engine-loop phase")
    add_engine_arguments(parser)


def _decode_steps(llm, batch: int, context: int, steps: int, around=contextlib.nullcontext) -> list:
    """Add ``batch`` requests, step until all are decoding, then record ``steps`` pure-decode steps (inside
    the context manager ``around()``)."""
    from pdserve.engine.sampling_params import SamplingParams

    rng = random.Random(batch)
    vocab = llm.config.model.hf_config.vocab_size
    # Long enough that the first requests are still decoding when the last prompt is prefilled.
    prefill_steps = -(-batch * context // llm.config.scheduler.max_num_batched_tokens) + 1
    params = SamplingParams(max_tokens=prefill_steps + steps + 8, temperature=0.0, ignore_eos=True)
    engine, core = llm.engine, llm.engine.core
    ids = [engine.add_request([rng.randint(100, vocab - 1) for _ in range(context)], params) for _ in range(batch)]

    def prefilling(rid: str) -> bool:
        request = core.scheduler.get_request(rid)
        return request is not None and request.num_computed_tokens < request.num_prompt_tokens

    while any(prefilling(rid) for rid in ids):
        engine.step()
    engine.step()  # the first pure-decode step may still warm something up
    core.record_step_stats()
    with around():
        for _ in range(steps):
            engine.step()
    stats = core.step_stats
    core.record_step_stats(False)
    for rid in ids:
        engine.abort_request(rid)  # the rest of their tokens are not needed
    return [s for s in stats if s.num_decodes == s.num_seqs == batch]


def run(args: argparse.Namespace) -> int:
    from pdserve.bench import roofline
    from pdserve.engine.llm import LLM

    kw = engine_kwargs(args)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    kw["max_num_seqs"] = max(kw["max_num_seqs"], *batches)
    llm = LLM(**kw)
    runner = llm.engine.core.runner
    device = runner.device
    bandwidth = roofline.measure_copy_bandwidth(device)
    weights = roofline.decode_weight_bytes(runner.model)
    kv_token = roofline.kv_bytes_per_token(llm.config.model.hf_config, runner.kv_spec.dtype.itemsize)
    graphs = runner.graph_runner
    print(f"model={llm.config.model.model} device={device} weights read per step={weights / 1e9:.2f} GB "
          f"KV/token={kv_token / 1e3:.1f} kB copy bandwidth={bandwidth / 1e12:.2f} TB/s "
          f"graphs={graphs.sizes if graphs else 'off'}")
    for batch in batches:
        host = cProfile.Profile() if args.host else None
        around = (lambda h=host: h) if host else contextlib.nullcontext
        stats = _decode_steps(llm, batch, args.context, args.steps, around)
        if not stats:
            print(f"batch {batch}: no step ran the whole batch as decodes (KV cache too small?)")
            continue
        step_s = statistics.median(s.duration_s for s in stats)
        ctx = statistics.median(s.total_context for s in stats)
        share = (weights + kv_token * ctx) / step_s / bandwidth
        print(f"batch {batch:4d} context {args.context}: step {step_s * 1e3:7.3f} ms  {batch / step_s:9.1f} tok/s  "
              f"roofline {share:6.1%}  (KV {kv_token * ctx / 1e9:.2f} GB, {len(stats)} steps)")
        if args.phases:
            _phase_table(llm, batch, args.context, args.steps)
        if host is not None:
            out = io.StringIO()
            pstats.Stats(host, stream=out).sort_stats("tottime").print_stats(22)
            print(out.getvalue())
        if args.kernels and device.type == "cuda":
            _kernel_table(llm, batch, args.context)
    return 0


def _phase_table(llm, batch: int, context: int, steps: int) -> None:
    """Time the phases of each step by wrapping the engine's methods for the duration of one measurement."""
    engine, core = llm.engine, llm.engine.core
    targets = [("schedule", core.scheduler, "schedule"), ("execute (host)", core.runner, "execute_model"),
               ("sample (+GPU wait)", core.sampler, "sample"), ("update", core.scheduler, "update_from_output"),
               ("core.step", core, "step"), ("output processor", engine.processor, "process"),
               ("engine.step", engine, "step")]
    if core.async_scheduling:  # sampling is launched, and the GPU waited for, in separate phases
        targets += [("sample launch", core.sampler, "launch"), ("GPU wait + update", core, "_finish_in_flight")]
    if core.runner.graph_runner is not None:
        targets.append(("  graph run (host)", core.runner.graph_runner, "run"))
    totals = dict.fromkeys((name for name, _, _ in targets), 0.0)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
        return wrapper

    @contextlib.contextmanager
    def installed():
        for name, obj, attr in targets:
            setattr(obj, attr, timed(name, getattr(obj, attr)))
        try:
            yield
        finally:
            for _, obj, attr in targets:
                delattr(obj, attr)  # back to the class's method

    n = max(1, len(_decode_steps(llm, batch, context, steps, installed)))
    print(f"  phases, ms per decode step ({n} steps):")
    for name, total in totals.items():
        print(f"    {name:22s} {total / steps * 1e3:8.3f}")
    graphs = core.runner.graph_runner
    fits = [s for s in graphs.sizes if s >= batch] if graphs is not None and graphs.use_graphs else []
    size = fits[0] if fits else None
    if size is not None:
        import torch

        # Replaying again rewrites the last step's K/V into the same slots: harmless.
        host = []
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            graphs._graphs[size].replay()
            host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            graphs._graphs[size].replay()
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - start) / 10
        print(f"    graph {size}: replay() host call {statistics.median(host) * 1e3:.3f} ms, back-to-back replay "
              f"{gpu * 1e3:.3f} ms")


def _kernel_table(llm, batch: int, context: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    _decode_steps(llm, batch, context, 8, lambda: prof)
    torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    start = time.perf_counter()
    code = run(parser.parse_args())
    print(f"done in {time.perf_counter() - start:.0f}s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
