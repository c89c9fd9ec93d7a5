"""``pdserve bench serve``: load a running OpenAI-compatible server (pdserve or any other) and measure it.

    pdserve bench serve --base-url http://127.0.0.1:8000 --dataset random --num-prompts 200 \\
        --request-rate 2,4,8 --slo ttft_p99=0.5 --slo tpot_p99=0.05 --result-dir bench-results
    pdserve bench serve --dataset shared-prefix --num-tenants 8 --system-prompt-len 1000 --max-concurrency 16
    pdserve bench serve --sweep --slo ttft_p99=1.0 --slo tpot_p99=0.1   # highest rate that meets the SLOs
    pdserve bench serve --peer vllm --serve-model llama-3.1-8b --dataset mixed --request-rate 2,4,8 \\
        --slo ttft_p99=2 --slo itl_p99=0.1 --peer-pythonpath /tmp/vsite   # vllm serve, then pdserve serve

Writes ``<result-dir>/serve.json`` (configuration, every run's summary, the sweep's answer), ``latency_cdf.png``
and, with several rates or ``--sweep``, ``latency_vs_rate.png``. With ``--peer`` (bench/serve_peer.py) the
benchmark starts both servers itself, writes each one's files under ``<result-dir>/<engine>/`` and the side-by-side
figures to ``<result-dir>/comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from pdserve.bench.serve_peer import add_arguments as add_peer_arguments


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad request rate list {text!r} (e.g. 1,2,4 or inf)") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("request rates must be positive (inf: all at once)")
    return rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    g.add_argument("--model", default=None, help="model name to send (default: the first one the server lists)")
    g.add_argument("--api-key", default=None)
    add_request_arguments(g)
    add_workload_arguments(parser)
    g = add_load_arguments(parser)
    g.add_argument("--sweep", action="store_true", help="bisect the highest request rate that meets the SLOs")
    g.add_argument("--sweep-max-rate", type=float, default=256.0)
    g.add_argument("--sweep-iterations", type=int, default=4, help="bisection steps after bracketing")
    g = parser.add_argument_group("output")
    g.add_argument("--result-dir", default="bench-results")
    g.add_argument("--label", default=None, help="name of this run in the JSON and the plots")
    g.add_argument("--save-detailed", action="store_true", help="also store every request's timings")
    g.add_argument("--disable-tqdm", action="store_true")
    add_peer_arguments(parser)


def add_request_arguments(g: Any) -> None:
    """How each request is sent (shared with ``pdserve bench tune``)."""
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens (vLLM/pdserve extension)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--no-timing", dest="timing", action="store_false",
                   help="do not ask pdserve servers for each request's phase timeline (x-pdserve-timing); by "
                        "default the run reports where the time went, phase by phase")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The requests of a run (shared with ``pdserve bench tune``); see :func:`build_dataset`."""
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", choices=["random", "sharegpt", "shared-prefix", "mixed"], default="random",
                   help="mixed: long prompts with short outputs (--mixed-*) among chat-like requests (--random-*)")
    g.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file (--dataset sharegpt)")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--random-input-len", type=int, default=128)
    g.add_argument("--random-output-len", type=int, default=64)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--sharegpt-output-len", type=int, default=None, help="override each answer's length")
    g.add_argument("--num-tenants", type=int, default=8)
    g.add_argument("--system-prompt-len", type=int, default=1000, help="words in each tenant's system prompt")
    g.add_argument("--question-len", type=int, default=32)
    g.add_argument("--shared-output-len", type=int, default=64)
    g.add_argument("--mixed-long-fraction", type=float, default=0.2, help="share of long-prompt requests")
    g.add_argument("--mixed-long-input-len", type=int, default=2000)
    g.add_argument("--mixed-long-output-len", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)


def add_load_arguments(parser: argparse.ArgumentParser) -> Any:
    """Arrivals, warm-up and SLOs (shared with ``pdserve bench tune``); returns the group for more flags."""
    g = parser.add_argument_group("load")
    g.add_argument("--request-rate", type=_rates, default=[math.inf],
                   help="requests/s, or a comma list for several runs; inf sends all at once (default)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals: 1 = Poisson")
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) before each run")
    g.add_argument("--slo", action="append", default=[], help="e.g. ttft_p99=0.5 (repeatable)")
    return g


def build_dataset(args: argparse.Namespace) -> list[Any]:
    from pdserve.bench import datasets as ds

    if args.dataset == "random":
        return ds.random_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                                 args.random_range_ratio, args.seed)
    if args.dataset == "mixed":
        return ds.mixed_dataset(args.num_prompts, args.mixed_long_fraction, args.mixed_long_input_len,
                                args.mixed_long_output_len, args.random_input_len, args.random_output_len,
                                args.random_range_ratio, args.seed)
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path")
        return ds.sharegpt_dataset(args.dataset_path, args.num_prompts, args.seed, args.sharegpt_output_len)
    return ds.shared_prefix_dataset(args.num_prompts, args.num_tenants, args.system_prompt_len, args.question_len,
                                    args.shared_output_len, args.seed)


class Bench:
    """One benchmark invocation: runs load levels against an endpoint and keeps their results."""

    def __init__(self, args: argparse.Namespace, endpoint: Any, requests: list[Any], slos: list[Any]) -> None:
        self.args, self.endpoint, self.requests, self.slos = args, endpoint, requests, slos
        self.trials: list[dict[str, Any]] = []
        self.raw: dict[float, list[Any]] = {}

    async def trial(self, rate: float) -> dict[str, Any]:
        from pdserve.bench.metrics import format_summary, summarize
        from pdserve.bench.runner import run_load

        a = self.args
        if a.warmup:
            await run_load(self.endpoint, self.requests[:a.warmup], math.inf, progress=False)
        results, duration = await run_load(self.endpoint, self.requests, rate, a.burstiness, a.max_concurrency,
                                           a.seed, progress=not a.disable_tqdm)
        summary = summarize(results, duration, self.slos)
        print(format_summary(summary, f"rate {rate:g} req/s"), flush=True)
        trial: dict[str, Any] = {"request_rate": rate, "summary": summary}
        if a.save_detailed:
            trial["requests"] = [asdict(r) for r in results]
        self.trials.append(trial)
        self.raw[rate] = results
        return summary

    async def sweep(self) -> float | None:
        """Highest rate meeting the SLOs: double from the first rate until it fails, then bisect."""
        a = self.args
        rate = a.request_rate[0] if not math.isinf(a.request_rate[0]) else 1.0
        ok, bad = 0.0, None
        while rate <= a.sweep_max_rate:
            if (await self.trial(rate))["meets_slos"]:
                ok, rate = rate, rate * 2
            else:
                bad = rate
                break
        if bad is None:
            return ok or None  # met the SLOs up to the cap
        for _ in range(a.sweep_iterations):
            mid = (ok + bad) / 2
            if (await self.trial(mid))["meets_slos"]:
                ok = mid
            else:
                bad = mid
        return ok or None


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from pdserve.bench.client import Endpoint, served_model
    from pdserve.bench.metrics import parse_slo

    slos = [parse_slo(s) for s in args.slo]
    if args.sweep and not slos:
        raise ValueError("--sweep needs at least one --slo")
    requests = build_dataset(args)
    model = args.model
    if model is None:
        async with httpx.AsyncClient(timeout=30) as client:
            model = await served_model(client, args.base_url, args.api_key)
    endpoint = Endpoint(args.base_url, model, chat=args.endpoint == "chat", api_key=args.api_key,
                        ignore_eos=args.ignore_eos, temperature=args.temperature, timing=args.timing)
    bench = Bench(args, endpoint, requests, slos)
    best = None
    if args.sweep:
        best = await bench.sweep()
    else:
        for rate in args.request_rate:
            await bench.trial(rate)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}
    return {"label": args.label or f"{args.dataset}-{model}", "model": model, "config": config,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": bench.trials,
            "max_rate_meeting_slos": best, "_raw": bench.raw}


def _finite(obj: Any) -> Any:
    """NaN and infinity (no data, an unbounded rate) as JSON null / "inf", so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else "inf"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(result: dict[str, Any], result_dir: str) -> list[str]:
    """serve.json and the PNG figures; returns the paths written."""
    from pdserve.bench.plots import plot_latency_cdfs, plot_vs_rate

    os.makedirs(result_dir, exist_ok=True)
    raw = result.pop("_raw")
    paths = [os.path.join(result_dir, "serve.json")]
    with open(paths[0], "w") as f:
        json.dump(_finite(result), f, indent=2, default=str)
    label = result["label"]
    runs = [(f"{rate:g} req/s", results) for rate, results in sorted(raw.items())]
    paths.append(os.path.join(result_dir, "latency_cdf.png"))
    plot_latency_cdfs(runs, paths[-1], f"{label}: latency CDFs")
    if sum(1 for t in result["runs"] if not math.isinf(t["request_rate"])) >= 2:
        paths.append(os.path.join(result_dir, "latency_vs_rate.png"))
        plot_vs_rate(result["runs"], paths[-1], f"{label}: latency and throughput vs rate",
                     result["runs"][0]["summary"].get("slos"))
    return paths


def run(args: argparse.Namespace) -> int:
    import asyncio

    import httpx

    if args.peer != "none":
        from pdserve.bench.serve_peer import run_with_peer

        return run_with_peer(args)
    from pdserve.bench.peer import refuse_unused_peer_flags
    from pdserve.bench.serve_peer import SERVE_FLAGS, SERVE_PEERS

    # Without --peer the benchmark loads the server at --base-url.
    refuse_unused_peer_flags(args, SERVE_PEERS, SERVE_FLAGS)
    try:
        result = asyncio.run(_main(args))
    except (ValueError, OSError, RuntimeError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.sweep:
        best = result["max_rate_meeting_slos"]
        print(f"highest request rate meeting the SLOs: {best:.3g} req/s" if best else
              "no tested request rate met the SLOs")
    for path in write_outputs(result, args.result_dir):
        print(f"wrote {path}")
    failed = sum(t["summary"]["failed"] for t in result["runs"])
    return 1 if failed and not args.sweep else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
