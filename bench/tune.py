"""``pdserve bench tune``: search engine settings for the highest goodput under SLOs on a workload, and print the
``pdserve serve`` command line that got it.

    pdserve bench tune --model llama-3.1-8b --serve-args "--load-format dummy" \\
        --max-num-seqs 64 128 256 --max-num-batched-tokens 2048 4096 8192 --kv-cache-dtype auto fp8_e4m3 \\
        --cuda-graph-sizes default 1,2,4,8,16,32,64 --dataset sharegpt --dataset-path sg.json \\
        --num-prompts 500 --request-rate 16 --slo ttft_p99=0.5 --slo tpot_p99=0.05 --max-trials 10

Every candidate is a real ``pdserve serve`` process (the model, ``--serve-args`` and the candidate's settings) on
a free local port; ``pdserve bench serve``'s workload (same dataset, arrival process and warm-up) is sent to it and
its goodput computed the same way: requests per second that meet every SLO on their own. The search is coordinate
descent (``bench/tune_search.py``), at most ``--max-trials`` servers. CUDA graph sizes are not searched on a CPU
(nor with ``--enforce-eager``): there are no graphs. Writes ``<result-dir>/tune.json`` and one log per trial.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
from typing import Any

from pdserve.bench.serve import _finite, add_load_arguments, add_request_arguments, add_workload_arguments
from pdserve.bench.tune_search import Trial, best_trial, coordinate_descent, format_table, grid_size
from pdserve.cli.local_servers import free_port, wait_http_ok

# tune flag (and Trial.settings key) -> the `pdserve serve` flag it sets
SETTINGS = {"max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-num-batched-tokens",
            "cuda_graph_sizes": "--cuda-graph-sizes", "kv_cache_dtype": "--kv-cache-dtype"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--model", default="smollm2-135m-instruct", help="the model every candidate serves")
    g.add_argument("--serve-args", default="", help="other `pdserve serve` flags, the same for every candidate")
    g.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a candidate may take to start")
    add_request_arguments(g)
    g = parser.add_argument_group("search space (values tried per setting; the first is the starting point)")
    g.add_argument("--max-num-seqs", type=int, nargs="+", default=None)
    g.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=None)
    g.add_argument("--cuda-graph-sizes", nargs="+", default=None,
                   help="each a comma list of batch sizes, or 'default' (the engine's ladder); GPU only")
    g.add_argument("--kv-cache-dtype", nargs="+", default=None, choices=["auto", "fp8_e4m3"])
    g.add_argument("--max-trials", type=int, default=12, help="servers started at most")
    add_workload_arguments(parser)
    add_load_arguments(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--result-dir", default="tune-results")
    g.add_argument("--disable-tqdm", action="store_true")


def search_space(args: argparse.Namespace, serve_args: list[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """The settings to search (name -> values) and notes on what was left out; ValueError for a bad request."""
    space: dict[str, list[Any]] = {}
    notes = []
    for name, flag in SETTINGS.items():
        values = getattr(args, name)
        if not values:
            continue
        if flag in serve_args:
            raise ValueError(f"{flag} is both searched and fixed in --serve-args")
        if name == "cuda_graph_sizes":
            values = [_graph_sizes(v) for v in values]
            if not _has_cuda_graphs(serve_args):
                notes.append("CUDA graph sizes not searched: this engine runs on a CPU or eagerly (no graphs)")
                continue
        space[name] = list(dict.fromkeys(values))  # in order, without repeats
    if not space:
        raise ValueError("nothing to search: give values for at least one of " + ", ".join(SETTINGS.values()))
    return space, notes


def _graph_sizes(text: str) -> str:
    if text == "default":
        return text
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"bad --cuda-graph-sizes value {text!r}: a comma list of batch sizes or 'default'") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"bad --cuda-graph-sizes value {text!r}: batch sizes are positive")
    return ",".join(map(str, sizes))


def _has_cuda_graphs(serve_args: list[str]) -> bool:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    known, _ = parser.parse_known_args(serve_args)
    if known.enforce_eager or known.device == "cpu":
        return False
    if known.device == "auto":
        import torch

        return torch.cuda.is_available()
    return True


def candidate_flags(settings: dict[str, Any]) -> list[str]:
    flags = []
    for name, value in settings.items():
        if not (name == "cuda_graph_sizes" and value == "default"):
            flags += [SETTINGS[name], str(value)]
    return flags


class Candidates:
    """Starts one ``pdserve serve`` per candidate and loads it with the workload."""

    def __init__(self, args: argparse.Namespace, serve_args: list[str], requests: list[Any], slos: list[Any]):
        self.args, self.serve_args, self.requests, self.slos = args, serve_args, requests, slos
        self.api_key = secrets.token_urlsafe(16)  # the servers' key (PDSERVE_API_KEY), sent by the load client
        self.count = 0

    def command(self, flags: list[str], port: int | None = None) -> list[str]:
        port_flags = ["--port", str(port)] if port is not None else []
        return ["pdserve", "serve", "--model", self.args.model, *port_flags, *self.serve_args, *flags]

    def measure(self, settings: dict[str, Any]) -> Trial:
        self.count += 1
        trial = Trial(self.count, dict(settings), candidate_flags(settings))
        port = free_port()
        log_path = os.path.join(self.args.result_dir, f"trial-{trial.index}.log")
        argv = [sys.executable, "-P", "-m", "pdserve.cli.main", *self.command(trial.flags, port)[1:]]
        print(f"trial {trial.index}: {shlex.join(self.command(trial.flags))}", flush=True)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PDSERVE_API_KEY": self.api_key})
            try:
                base_url = f"http://127.0.0.1:{port}"
                trial.error = _wait_healthy(proc, base_url, self.args.startup_timeout, log_path)
                if not trial.error:
                    trial.summary = asyncio.run(self._load(base_url))
            except Exception as exc:  # the run failed (the server died mid-run, ...): a trial without a result
                trial.error = f"{type(exc).__name__}: {exc}"
            finally:
                _stop(proc)
        if trial.error:
            print(f"trial {trial.index}: {trial.error}", flush=True)
        return trial

    async def _load(self, base_url: str) -> dict[str, Any]:
        import httpx

        from pdserve.bench.client import Endpoint, served_model
        from pdserve.bench.serve import Bench

        a = self.args
        async with httpx.AsyncClient(timeout=30) as client:
            model = await served_model(client, base_url, self.api_key)
        endpoint = Endpoint(base_url, model, chat=a.endpoint == "chat", api_key=self.api_key,
                            ignore_eos=a.ignore_eos, temperature=a.temperature, timing=a.timing)
        bench = Bench(argparse.Namespace(**{**vars(a), "save_detailed": False}), endpoint, self.requests, self.slos)
        summary = await bench.trial(a.request_rate[0])
        return summary


def _wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: str) -> str:
    """"" once ``/health`` answers 200; else why not (the server exited, e.g. refusing the settings)."""
    error = wait_http_ok(f"{base_url}/health", proc, timeout_s)
    if error and proc.poll() is not None:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        return f"server exited ({proc.returncode}): {lines[-1] if lines else 'no output'}"
    return error


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    from pdserve.bench.metrics import parse_slo
    from pdserve.bench.serve import build_dataset

    try:
        serve_args = shlex.split(args.serve_args)
        space, notes = search_space(args, serve_args)
        slos = [parse_slo(s) for s in args.slo]
        if not slos:
            raise ValueError("goodput needs at least one --slo (e.g. --slo ttft_p99=0.5 --slo tpot_p99=0.05)")
        if len(args.request_rate) != 1:
            raise ValueError("give one --request-rate: every candidate is measured under the same load")
        if args.max_trials < 1:
            raise ValueError("--max-trials must be at least 1")
        requests = build_dataset(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.result_dir, exist_ok=True)
    for note in notes:
        print(note)
    print(f"searching {', '.join(space)} by coordinate descent: at most {args.max_trials} of {grid_size(space)} "
          f"settings, {len(requests)} requests at {args.request_rate[0]:g} req/s each", flush=True)
    candidates = Candidates(args, serve_args, requests, slos)
    trials = coordinate_descent(space, candidates.measure, args.max_trials)
    best = best_trial(trials)
    print()
    print(format_table(trials, list(space), [s.key for s in slos]))
    command = shlex.join(candidates.command(best.flags))
    with open(os.path.join(args.result_dir, "tune.json"), "w") as f:
        json.dump(_finite({"space": space, "slos": [s.key + f"={s.bound_s:g}" for s in slos],
                           "request_rate": args.request_rate[0], "best_trial": best.index, "best_command": command,
                           "trials": [{"trial": t.index, "settings": t.settings, "error": t.error,
                                       "goodput": t.goodput, "summary": t.summary} for t in trials]}),
                  f, indent=2, default=str)
    if best.error:
        print("no candidate ran: see the trial logs in " + args.result_dir, file=sys.stderr)
        return 1
    met = "" if best.summary.get("meets_slos") else " (its run as a whole did not meet every SLO)"
    print(f"\nbest: trial {best.index}, goodput {best.goodput:.3f} req/s{met}")
    print(command)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench tune", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
