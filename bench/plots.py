"""PNG figures of a benchmark: latency CDFs of one run, and latency / throughput against the request rate."""

from __future__ import annotations

import math
from typing import Any

from pdserve.bench.client import RequestResult

_PANELS = (("ttft", "time to first token"), ("tpot", "time per output token"), ("itl", "inter-token latency"),
           ("e2el", "end-to-end latency"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(results: list[RequestResult], metric: str) -> list[float]:
    ok = [r for r in results if r.success]
    if metric == "ttft":
        return [r.ttft * 1000 for r in ok]
    if metric == "tpot":
        return [r.tpot * 1000 for r in ok if r.tpot is not None]
    if metric == "itl":
        return [x * 1000 for r in ok for x in r.itl]
    return [r.latency * 1000 for r in ok]


def plot_latency_cdfs(runs: list[tuple[str, list[RequestResult]]], path: str, title: str) -> None:
    """One panel per latency metric, one CDF line per run (label, results)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (metric, name) in zip(axes.flat, _PANELS):
        for label, results in runs:
            xs = sorted(_series(results, metric))
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if metric != "itl" else "fraction of tokens")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    _save(plt, fig, path, title)


def plot_vs_rate(trials: list[dict[str, Any]], path: str, title: str, slos: dict[str, float] | None = None) -> None:
    """Latency percentiles and throughput/goodput against the offered request rate (trials sorted by rate)."""
    plt = _pyplot()
    trials = sorted((t for t in trials if not math.isinf(t["request_rate"])), key=lambda t: t["request_rate"])
    rates = [t["request_rate"] for t in trials]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric in zip(axes[:2], ("ttft", "tpot")):
        for p in ("p50", "p90", "p99"):
            ax.plot(rates, [t["summary"][f"{p}_{metric}_ms"] for t in trials], marker="o", label=p)
        for key, bound in (slos or {}).items():
            if key.startswith(metric + "_"):
                ax.axhline(bound * 1000, color="red", linestyle="--", label=f"SLO {key}")
        ax.set_title(f"{metric.upper()} vs request rate")
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(rates, [t["summary"]["request_throughput"] for t in trials], marker="o", label="throughput")
    if trials and "goodput" in trials[0]["summary"]:
        ax.plot(rates, [t["summary"]["goodput"] for t in trials], marker="s", label="goodput")
    ax.plot(rates, rates, color="gray", linestyle=":", label="offered")
    ax.set_title("requests/s vs request rate")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path, title)


def _save(plt: Any, fig: Any, path: str, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
