"""Decode pod vs monolithic engine (issue 17): inter-token latency at a fixed batch when the requests' KV arrives
through a KV connector, against the monolithic engine decoding the same requests, on the same model.

    .venv/bin/python -P scripts/gpu_decode_pod_itl.py --model llama-3.1-8b --load-format dummy \\
        [--connector shared-fs|grpc] [--batch 64 --context 1024 --steps 64] [any engine flag]

Each phase runs in its own process, so each engine has the device to itself:

1. monolithic: ``batch`` prompts of ``context`` random tokens, decoded to the end;
2. prefill role: the same prompts with ``max_tokens`` 1; their KV is saved to a store directory (``shared-fs``,
   the process then exits) or served from the prefill's cache (``grpc``: the process stays up while the decode
   process pulls, over CUDA IPC on one GPU; give it a share of the memory with ``--prefill-memory``);
3. decode role: each prompt plus the prefill's first token, with the transfer handle, decoded to the end.

The ITL of an engine is the median duration of its steps in which all ``batch`` requests decode (every such step
gives each request one token; with asynchronous scheduling a step runs from the previous step's completion to its
own, so durations add up to the wall time). Printed: both ITLs, their ratio (decode / monolithic), and how many
requests produced the same tokens both ways. Exit status 1 when the ratio exceeds ``1 + --tolerance`` (0.05).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

from pdserve.cli.engine_args import add_engine_arguments, engine_kwargs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connector", choices=("shared-fs", "grpc"), default="shared-fs")
    parser.add_argument("--batch", type=int, default=64, help="requests decoding at once")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens of every request")
    parser.add_argument("--steps", type=int, default=64, help="decode steps at the full batch, at least")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed ITL ratio above 1")
    parser.add_argument("--kv-path", default=None, help="shared-fs store directory (default: a temporary one)")
    parser.add_argument("--prefill-memory", type=float, default=0.4,
                        help="grpc: the prefill process's --gpu-memory-utilization (both engines share the GPU)")
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def _prompts(batch: int, context: int, vocab: int) -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(100, vocab) for _ in range(context)] for _ in range(batch)]


def _engine(kw: dict[str, Any], secret_text: str, role: str = "both", connector: str | None = None,
            options: dict | None = None) -> Any:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.engine_core import EngineCore
    from pdserve.engine.security import ClusterSecret

    secret = ClusterSecret.from_text(secret_text)
    extra = dict(role=role, connector=connector, options=tuple(sorted((options or {}).items())),
                 cluster_secret=secret) if connector else {}
    return EngineCore(EngineConfig.create(**{**kw, "hash_seed": secret.hash_seed()}, **extra))


def _decode(core: Any, requests: list[Any], batch: int) -> tuple[float, int, dict[str, list[int]]]:
    """Run ``requests`` to the end; (median full-batch decode step in s, number of such steps, tokens per id)."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        core.add_request(r)
    core.record_step_stats()
    deadline = time.monotonic() + 1800
    while core.has_unfinished_requests():
        if time.monotonic() > deadline:
            raise RuntimeError("the engine did not finish in 30 minutes")
        for out in core.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            tokens[out.request_id] += out.new_token_ids
    full = [s.duration_s for s in core.step_stats if s.num_decodes == s.num_seqs == batch]
    core.record_step_stats(False)
    return (statistics.median(full) if full else float("nan")), len(full), tokens


def _monolithic(conn: Any, kw: dict, secret: str, prompts: list[list[int]], max_tokens: int) -> None:
    from pdserve.engine.engine_core import EngineCoreRequest
    from pdserve.engine.sampling_params import SamplingParams

    core = _engine(kw, secret)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    itl, n, tokens = _decode(core, [EngineCoreRequest(f"r{i}", p, params) for i, p in enumerate(prompts)],
                             len(prompts))
    conn.send((itl, n, tokens, core.async_scheduling))
    core.shutdown()


def _prefill(conn: Any, kw: dict, secret: str, connector: str, options: dict, prompts: list[list[int]]) -> None:
    """Prefill every prompt; send {id: (first token, handle)}; keep serving (grpc) until told to stop."""
    from pdserve.engine.engine_core import EngineCoreRequest
    from pdserve.engine.sampling_params import SamplingParams

    core = _engine(kw, secret, "prefill", connector, options)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(EngineCoreRequest(f"r{i}", p, params))
    firsts: dict[str, tuple[list[int], dict]] = {}
    while len(firsts) < len(prompts):
        for out in core.step():
            if out.error:
                raise RuntimeError(f"prefill of {out.request_id} failed: {out.error}")
            if out.finish_reason is not None:
                firsts[out.request_id] = (out.new_token_ids, out.kv_transfer_params)
    if connector == "shared-fs":
        while core.has_unfinished_requests():  # every save written before the decode process looks
            core.step()
    conn.send(firsts)
    while not conn.poll(0.002):  # grpc: step so the KV server registers the transfers and peers' releases land
        if core.has_unfinished_requests():
            core.step()
    core.shutdown()


def _decode_pod(conn: Any, kw: dict, secret: str, connector: str, options: dict, prompts: list[list[int]],
                firsts: dict, max_tokens: int) -> None:
    from pdserve.engine.engine_core import EngineCoreRequest
    from pdserve.engine.sampling_params import SamplingParams

    core = _engine(kw, secret, "decode", connector, options)
    params = SamplingParams(max_tokens=max_tokens - 1, temperature=0.0, ignore_eos=True)
    requests = [EngineCoreRequest(f"r{i}", p + firsts[f"r{i}"][0], params, kv_transfer_params=firsts[f"r{i}"][1])
                for i, p in enumerate(prompts)]
    itl, n, tokens = _decode(core, requests, len(prompts))
    stats = core.scheduler.kv_connector.stats.snapshot()
    # Only each request's last known token is computed (the prefill's first): the KV came through the connector.
    computed_prompt = core.num_computed_tokens_total - len(prompts) * (max_tokens - 1)
    conn.send((itl, n, tokens, core.async_scheduling, dict(stats.failures), computed_prompt))
    core.shutdown()


def _in_process(target: Any, *args: Any) -> tuple[Any, Any, Any]:
    """Start ``target(conn, *args)`` in a child process; (process, parent end of its pipe, its result receiver).

    Forked: the parent imported the engine (not CUDA, which it never initializes), so children skip that."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()

    def result(timeout: float = 3600) -> Any:
        if not parent.poll(timeout):
            raise RuntimeError(f"{target.__name__} gave no result")
        return parent.recv()

    return proc, parent, result


def main(argv: list[str] | None = None) -> int:
    from pdserve.engine.model_loader import resolve_model
    from pdserve.engine.security import ClusterSecret, load_cluster_secret

    args = parse_args(argv)
    import pdserve.engine.engine_core  # noqa: F401  (imported once, before the children fork)
    kw = engine_kwargs(args)
    kw["max_num_seqs"] = max(kw["max_num_seqs"], args.batch)
    hf_config = resolve_model(kw["model"], kw["load_format"]).hf_config
    prompts = _prompts(args.batch, args.context, hf_config.vocab_size)
    # Long enough that the first requests still decode when the last prompt is in: `steps` full-batch steps.
    max_tokens = -(-args.batch * args.context // kw["max_num_batched_tokens"]) + args.steps + 8
    secret = (load_cluster_secret() or ClusterSecret.generate()).to_text()
    tmp = tempfile.TemporaryDirectory(prefix="pdserve-itl-")
    options: dict[str, Any] = {"kv_load_timeout_s": 120.0}
    if args.connector == "shared-fs":
        options["kv_path"] = args.kv_path or os.path.join(tmp.name, "kv")

    proc, _, result = _in_process(_monolithic, kw, secret, prompts, max_tokens)
    mono_itl, mono_n, mono_tokens, mono_async = result()
    proc.join()

    prefill_kw = dict(kw, gpu_memory_utilization=args.prefill_memory) if args.connector == "grpc" else kw
    pproc, pconn, presult = _in_process(_prefill, prefill_kw, secret, args.connector, options, prompts)
    firsts = presult()
    if args.connector == "shared-fs":
        pconn.send("stop")
        pproc.join()
    dproc, _, dresult = _in_process(_decode_pod, kw, secret, args.connector, options, prompts, firsts, max_tokens)
    dec_itl, dec_n, dec_tokens, dec_async, failures, computed_prompt = dresult()
    dproc.join()
    if pproc.is_alive():
        pconn.send("stop")
        pproc.join(60)
    tmp.cleanup()

    same = sum(mono_tokens[rid] == firsts[rid][0] + dec_tokens[rid] for rid in mono_tokens)
    ratio = dec_itl / mono_itl
    print(f"model={kw['model']} batch={args.batch} context={args.context} connector={args.connector} "
          f"max_tokens={max_tokens}")
    print(f"monolithic  ITL {mono_itl * 1e3:8.3f} ms  ({mono_n} full-batch steps, async scheduling "
          f"{'on' if mono_async else 'off'})")
    print(f"decode pod  ITL {dec_itl * 1e3:8.3f} ms  ({dec_n} full-batch steps, async scheduling "
          f"{'on' if dec_async else 'off'}; prompt tokens computed: {computed_prompt}; load failures: "
          f"{failures or 'none'})")
    print(f"ratio decode/monolithic {ratio:.4f}  (target <= {1 + args.tolerance:.2f}); same tokens in "
          f"{same}/{len(prompts)} requests")
    ok = ratio <= 1 + args.tolerance and not failures and computed_prompt == 0 and min(mono_n, dec_n) >= args.steps
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
