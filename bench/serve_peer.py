"""``pdserve bench serve --peer vllm``: start the peer's OpenAI-compatible server (``vllm serve``) on a model,
drive it with the benchmark's trace, stop it; then the same for ``pdserve serve`` on the same model directory and
settings; report both engines' TTFT / ITL quantiles, throughput and goodput per request rate, and the ratios.

Each server runs in a process group of its own on a free port, is polled on ``/health`` for at most
``--server-start-timeout`` seconds (its log's tail is shown if it exits or never gets there) and is killed as a
group afterwards. Requests always ignore EOS, so both servers generate the same number of tokens. A dummy preset
is served from a directory with the preset's config and the bundled tokenizer padded to its vocabulary
(bench/model_dir.py). ``--peer pdserve`` starts ``pdserve serve`` twice: a self-check of this path.
``--pdserve-up`` adds ``pdserve up`` as a third engine (bench/serve_up.py); it needs ``--peer`` (use ``--peer
pdserve`` to compare ``pdserve up`` with ``pdserve serve`` alone), and is refused without it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from pdserve.bench.peer import DEFAULT_TIMEOUT_S, PROCESS_FLAGS, add_process_arguments, log_dir, peer_label, ratio
from pdserve.bench.peer_process import (PeerError, ServerProcess, check_importable, free_port, peer_env,
                                       terminate_as_exit)
from pdserve.bench.serve_up import (UP, UP_FLAGS, UpProcess, add_up_arguments, add_up_ratios, format_up_ratios,
                                    up_command)

SERVE_PEERS = ("vllm", "pdserve")
# Both servers get these unless the flags say otherwise. Explicit batch limits: vLLM's own defaults depend on the
# GPU and differ from pdserve's.
SERVE_DEFAULTS: dict[str, Any] = {"serve_load_format": "dummy", "serve_dtype": "auto", "serve_max_num_seqs": 256,
                                  "serve_max_num_batched_tokens": 8192, "serve_gpu_memory_utilization": 0.9,
                                  "server_start_timeout": 900.0}
SERVE_FLAGS = (*PROCESS_FLAGS, *SERVE_DEFAULTS, "serve_model", "serve_max_model_len", "serve_no_prefix_caching",
               "pdserve_server_args", "peer_server_args", *UP_FLAGS)
# Summary fields compared side by side (bench/metrics.py's names).
COMPARED = ("completed", "failed", "request_throughput", "output_throughput", "goodput", "meets_slos",
            "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "p50_tpot_ms", "p99_tpot_ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = add_process_arguments(parser)
    g.add_argument("--peer", choices=["none", *SERVE_PEERS], default="none",
                   help="start the peer's server, then `pdserve serve`, on --serve-model with the same settings, "
                        "and drive both with the same requests (--base-url is not used then); pdserve: a "
                        "self-check of that path")
    g.add_argument("--serve-model", default=None,
                   help="with --peer: the model both servers load: a dummy preset (served with the bundled "
                        "tokenizer padded to its vocabulary), the bundled model, or a local directory with a "
                        "tokenizer")
    g.add_argument("--serve-load-format", choices=["auto", "dummy"], default=None,
                   help=f"default {SERVE_DEFAULTS['serve_load_format']}")
    g.add_argument("--serve-dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help=f"default {SERVE_DEFAULTS['serve_dtype']}")
    g.add_argument("--serve-max-model-len", type=int, default=None, help="default: the model's")
    g.add_argument("--serve-max-num-seqs", type=int, default=None,
                   help=f"default {SERVE_DEFAULTS['serve_max_num_seqs']}")
    g.add_argument("--serve-max-num-batched-tokens", type=int, default=None,
                   help=f"default {SERVE_DEFAULTS['serve_max_num_batched_tokens']}")
    g.add_argument("--serve-gpu-memory-utilization", type=float, default=None,
                   help=f"default {SERVE_DEFAULTS['serve_gpu_memory_utilization']}")
    g.add_argument("--serve-no-prefix-caching", action="store_true")
    g.add_argument("--pdserve-server-args", default=None,
                   help="more flags for `pdserve serve` (after ours, so they win), e.g. "
                        "--pdserve-server-args='--device cpu'")
    g.add_argument("--peer-server-args", default=None, help="more flags for the peer's server")
    g.add_argument("--server-start-timeout", type=float, default=None,
                   help="seconds each server may take to answer /health before it is killed (default "
                        f"{SERVE_DEFAULTS['server_start_timeout']:g})")
    add_up_arguments(g)


def common_flags(args: argparse.Namespace, port: int, name: str) -> list[str]:
    flags = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", name,
             "--load-format", args.serve_load_format, "--dtype", args.serve_dtype,
             "--max-num-seqs", str(args.serve_max_num_seqs),
             "--max-num-batched-tokens", str(args.serve_max_num_batched_tokens),
             "--gpu-memory-utilization", str(args.serve_gpu_memory_utilization), "--seed", "0"]
    if args.serve_max_model_len:
        flags += ["--max-model-len", str(args.serve_max_model_len)]
    if args.serve_no_prefix_caching:
        flags.append("--no-enable-prefix-caching")
    return flags


def server_command(engine: str, python: str, model_dir: str, args: argparse.Namespace, port: int, name: str,
                   extra: str) -> list[str]:
    """The command line of one server. ``-P``: the working directory (a pdserve checkout, whose ``operator/``
    would shadow the standard library's) stays off ``sys.path``."""
    if engine == "vllm":
        # Access logging off: pdserve's server does not log each request either.
        return [python, "-P", "-m", "vllm.entrypoints.cli.main", "serve", model_dir, *common_flags(args, port, name),
                "--disable-uvicorn-access-log", *shlex.split(extra)]
    # No admission limit: vLLM has none, so a burst must not be refused (429) by one server and queued by the other.
    return [python, "-P", "-m", "pdserve.cli.main", "serve", "--model", model_dir, *common_flags(args, port, name),
            "--max-waiting", "0", *shlex.split(extra)]


def compare(results: dict[str, dict[str, Any]], peer: str) -> dict[str, Any]:
    """Per request rate every server was run at: each one's compared summary fields and pdserve's ratios (and
    pdserve-up's, when it ran)."""
    theirs = {t["request_rate"]: t["summary"] for t in results[peer]["runs"]}
    rows = []
    up = {t["request_rate"]: t["summary"] for t in results[UP]["runs"]} if UP in results else None
    for trial in results["pdserve"]["runs"]:
        rate = trial["request_rate"]
        if rate not in theirs or (up is not None and rate not in up):
            continue  # a sweep may try different rates on each server
        ours = trial["summary"]
        row: dict[str, Any] = {"request_rate": rate, "pdserve": {k: ours.get(k) for k in COMPARED},
                               peer: {k: theirs[rate].get(k) for k in COMPARED}}
        row["output_throughput_ratio"] = ratio(ours["output_throughput"], theirs[rate]["output_throughput"])
        if "goodput" in ours:
            row["goodput_ratio"] = ratio(ours["goodput"], theirs[rate]["goodput"])
        if up is not None:
            add_up_ratios(row, up[rate], peer)
        rows.append(row)
    return {"peer": peer, "rows": rows, "max_rate_meeting_slos": {
        name: results[name]["max_rate_meeting_slos"] for name in ("pdserve", peer, UP) if name in results}}


def format_comparison(comparison: dict[str, Any]) -> str:
    peer = comparison["peer"]
    cols = ("done", "out tok/s", "goodput", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99")
    lines = [f"{'rate':>8} {'engine':<10}" + "".join(f"{c:>10}" for c in cols) + "   (latencies in ms)"]

    def fmt(v: Any) -> str:
        return "-" if v is None or v != v else f"{v:.1f}"

    for row in comparison["rows"]:
        for name in (n for n in (peer, "pdserve", UP) if n in row):
            s = row[name]
            values = [s["p50_ttft_ms"], s["p99_ttft_ms"], s["p50_itl_ms"], s["p99_itl_ms"]]
            lines.append(f"{row['request_rate']:>8g} {name:<10}{s['completed']:>10}{fmt(s['output_throughput']):>10}"
                         f"{fmt(s.get('goodput')):>10}" + "".join(f"{fmt(v):>10}" for v in values))
        good = f", goodput {row['goodput_ratio']:.2f}x" if "goodput_ratio" in row else ""
        lines.append(f"{'':>8} pdserve / {peer}: output throughput {row['output_throughput_ratio']:.2f}x{good}")
        lines += format_up_ratios(row, peer)
    best = comparison["max_rate_meeting_slos"]
    if any(v is not None for v in best.values()):
        lines.append("highest rate meeting the SLOs: " + ", ".join(
            f"{k} {v:.3g} req/s" if v else f"{k} none" for k, v in best.items()))
    return "\n".join(lines)


def _bench_one(args: argparse.Namespace, srv: ServerProcess, label: str, name: str) -> dict[str, Any]:
    import httpx

    from pdserve.bench.serve import _main, write_outputs

    run_args = copy.copy(args)
    run_args.base_url, run_args.model = srv.base_url, name
    run_args.result_dir = os.path.join(args.result_dir, label)
    run_args.label = f"{args.label or args.dataset}-{label}"
    timeout_s = args.peer_timeout or DEFAULT_TIMEOUT_S
    try:
        result = asyncio.run(asyncio.wait_for(_main(run_args), timeout_s))
    except TimeoutError:
        raise PeerError(f"the benchmark of {label} did not finish within {timeout_s:g} s (--peer-timeout); "
                        f"{srv.tail()}") from None
    except (ValueError, OSError, RuntimeError, httpx.HTTPError) as exc:
        raise PeerError(f"benchmarking {label} failed: {exc}; {srv.tail()}") from None
    if srv.exited():
        raise PeerError(f"{label} exited during the benchmark; {srv.tail()}")
    if any(t["summary"]["failed"] for t in result["runs"]):
        print(f"warning: requests to {label} failed; {srv.tail()}", file=sys.stderr)
    for path in write_outputs(result, run_args.result_dir):
        print(f"wrote {path}")
    return result


def _serve_and_bench(args: argparse.Namespace, srv: ServerProcess, name: str) -> dict[str, Any]:
    """Start ``srv``, wait for its ``/health``, run the trace against it, stop it."""
    print(f"starting {srv.name}: {shlex.join(srv.cmd)}", flush=True)
    with srv:
        print(f"{srv.name} healthy after {srv.wait_healthy(args.server_start_timeout):.1f} s", flush=True)
        return _bench_one(args, srv, srv.name, name)


def _unsigned(env: dict[str, str]) -> dict[str, str]:
    """The environment without pdserve's cluster secret: a pdserve server that has one takes only signed calls
    from pdserve's own parts, and the benchmark is a client like any other (both servers listen on 127.0.0.1)."""
    from pdserve.engine.security import SECRET_ENV, SECRET_FILE_ENV

    return {k: v for k, v in env.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)}


def run_with_peer(args: argparse.Namespace) -> int:
    """Both servers, one after the other, then the comparison (``<result-dir>/comparison.json``)."""
    with terminate_as_exit():
        return _run_with_peer(args)


def _run_with_peer(args: argparse.Namespace) -> int:
    from pdserve.bench.model_dir import serving_directory

    if not args.serve_model:
        print("error: --peer needs --serve-model (the model both servers load)", file=sys.stderr)
        return 2
    if not args.pdserve_up and (args.up_kv_connector or args.pdserve_up_args):
        print("error: --up-kv-connector and --pdserve-up-args need --pdserve-up", file=sys.stderr)
        return 2
    # Only a memory share the user chose goes to `pdserve up`'s engines; otherwise up splits the GPU between them.
    explicit_memory_share = args.serve_gpu_memory_utilization is not None
    for key, value in SERVE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    python = args.peer_python or sys.executable
    args.ignore_eos = True  # both servers generate exactly the requested lengths
    label = peer_label(args.peer)
    try:
        env = peer_env(args.peer_pythonpath, args.peer)
        check_importable(args.peer, python, env)
        directory = log_dir(args)
        model_dir = serving_directory(args.serve_model, args.serve_load_format, directory / "model")
        name = args.model or Path(args.serve_model.rstrip("/")).name
        results: dict[str, dict[str, Any]] = {}
        servers = ((args.peer, label, python, _unsigned(env), args.peer_server_args or ""),
                   ("pdserve", "pdserve", sys.executable, _unsigned(peer_env(None, "pdserve")),
                    args.pdserve_server_args or ""))
        for engine, tag, python, engine_env, extra in servers:
            port = free_port()
            cmd = server_command(engine, python, model_dir, args, port, name, extra)
            srv = ServerProcess(tag, cmd, engine_env, directory / f"{tag}.server.log", f"http://127.0.0.1:{port}")
            results[tag] = _serve_and_bench(args, srv, name)
    except (PeerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    up_failed = False
    if args.pdserve_up:
        # The two servers' results stand on their own: a failing `pdserve up` still leaves their comparison.
        try:
            port = free_port()
            cmd = up_command(sys.executable, model_dir, common_flags(args, port, name), args, port,
                             explicit_memory_share)
            srv = UpProcess(UP, cmd, _unsigned(peer_env(None, "pdserve")), directory / f"{UP}.server.log",
                            f"http://127.0.0.1:{port}")
            results[UP] = _serve_and_bench(args, srv, name)
        except (PeerError, ValueError, OSError) as exc:
            print(f"error: {exc}\n(the comparison below leaves {UP} out)", file=sys.stderr)
            up_failed = True
    comparison = compare(results, label)
    print(format_comparison(comparison))
    os.makedirs(args.result_dir, exist_ok=True)
    path = os.path.join(args.result_dir, "comparison.json")
    from pdserve.bench.serve import _finite

    with open(path, "w") as f:
        json.dump(_finite(comparison), f, indent=2)
    print(f"wrote {path} (server logs in {directory})")
    if up_failed:
        return 2
    failed = sum(t["summary"]["failed"] for r in results.values() for t in r["runs"])
    return 1 if failed and not args.sweep else 0
