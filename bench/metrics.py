"""Benchmark statistics: latency percentiles, throughput, and goodput under service-level objectives.

An SLO is ``<metric>_<stat>=<seconds>`` with metric ``ttft`` | ``tpot`` | ``itl`` | ``e2el`` and stat ``mean`` or
``pNN`` (e.g. ``ttft_p99=0.5``). A run *meets* its SLOs when every such statistic over all requests is within
its bound. **Goodput** counts the requests that are good on their own (their TTFT, TPOT, worst ITL and end-to-end
latency each within every bound given for that metric) per second of the run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pdserve.bench.client import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)
_SLO_RE = re.compile(r"^(ttft|tpot|itl|e2el)_(mean|p\d{1,2}(?:\.\d+)?)$")


@dataclass(frozen=True)
class Slo:
    metric: str
    stat: str  # "mean" or "pNN"
    bound_s: float

    @property
    def key(self) -> str:
        return f"{self.metric}_{self.stat}"


def parse_slo(text: str) -> Slo:
    """``"ttft_p99=0.5"`` -> Slo; ``ValueError`` with the accepted forms otherwise."""
    name, sep, value = text.partition("=")
    m = _SLO_RE.match(name.strip())
    try:
        bound = float(value)
    except ValueError:
        bound = -1.0
    if not sep or m is None or not bound > 0:
        raise ValueError(f"bad SLO {text!r}: expected <ttft|tpot|itl|e2el>_<mean|pNN>=<seconds>, "
                         f"e.g. ttft_p99=0.5")
    return Slo(m.group(1), m.group(2), bound)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _values(results: list[RequestResult], metric: str) -> list[float]:
    ok = [r for r in results if r.success]
    if metric == "ttft":
        return [r.ttft for r in ok]
    if metric == "tpot":
        return [r.tpot for r in ok if r.tpot is not None]
    if metric == "itl":
        return [x for r in ok for x in r.itl]
    return [r.latency for r in ok]


def stat(values: list[float], name: str) -> float:
    if name == "mean":
        return sum(values) / len(values) if values else math.nan
    return percentile(values, float(name[1:]))


def _request_is_good(r: RequestResult, slos: list[Slo]) -> bool:
    if not r.success:
        return False
    own = {"ttft": r.ttft, "tpot": r.tpot, "itl": max(r.itl) if r.itl else None, "e2el": r.latency}
    return all(own[s.metric] is None or own[s.metric] <= s.bound_s for s in slos)


def summarize(results: list[RequestResult], duration_s: float, slos: list[Slo] | None = None) -> dict[str, Any]:
    """The benchmark's headline numbers (latencies in milliseconds, throughputs per second)."""
    slos = slos or []
    ok = [r for r in results if r.success]
    out: dict[str, Any] = {
        "duration_s": duration_s, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": sum(r.output_tokens for r in ok),
    }
    d = max(duration_s, 1e-9)
    out["request_throughput"] = len(ok) / d
    out["output_throughput"] = out["total_output_tokens"] / d
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / d
    for metric in METRICS:
        values = _values(results, metric)
        out[f"mean_{metric}_ms"] = stat(values, "mean") * 1000
        out[f"std_{metric}_ms"] = (math.sqrt(sum((v - stat(values, "mean")) ** 2 for v in values) / len(values))
                                   * 1000) if values else math.nan
        for p in PERCENTILES:
            out[f"p{p}_{metric}_ms"] = percentile(values, p) * 1000
    if slos:
        out["slos"] = {s.key: s.bound_s for s in slos}
        out["slo_values_s"] = {s.key: stat(_values(results, s.metric), s.stat) for s in slos}
        out["meets_slos"] = bool(ok) and not (len(results) - len(ok)) and all(
            out["slo_values_s"][s.key] <= s.bound_s for s in slos)
        out["goodput"] = sum(_request_is_good(r, slos) for r in results) / d
    phases = phase_breakdown(ok)
    if phases:
        out["phases"] = phases
    errors = sorted({r.error for r in results if not r.success})
    if errors:
        out["errors"] = errors[:10]
    return out


def phase_breakdown(results: list[RequestResult]) -> dict[str, dict[str, Any]]:
    """Per phase of the servers' timelines (requests that returned one): mean and percentiles in milliseconds,
    how many requests had it, and whether it counts toward the time to first token. In timeline order."""
    order: list[str] = []
    for r in results:
        order += [name for name in r.phases if name not in order]
    out: dict[str, dict[str, Any]] = {}
    for name in order:
        values = [r.phases[name] for r in results if name in r.phases]
        row: dict[str, Any] = {"requests": len(values), "ttft": any(name in r.ttft_phases for r in results),
                               "mean_ms": stat(values, "mean") * 1000}
        for p in PERCENTILES:
            row[f"p{p}_ms"] = percentile(values, p) * 1000
        out[name] = row
    return out


def format_summary(s: dict[str, Any], title: str) -> str:
    """A fixed-width table for the terminal."""
    lines = [f"{'=' * 18} {title} {'=' * 18}"]

    def row(label: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        lines.append(f"{label:<40}{text:>14}")

    row("Successful requests:", s["completed"], "{}")
    row("Failed requests:", s["failed"], "{}")
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"], "{}")
    row("Total generated tokens:", s["total_output_tokens"], "{}")
    row("Request throughput (req/s):", s["request_throughput"])
    if "goodput" in s:
        row("Request goodput (req/s):", s["goodput"])
        row("Meets SLOs:", s["meets_slos"], "{}")
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for metric, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                         ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 14} {name} {'-' * 14}")
        row(f"Mean {metric.upper()} (ms):", s[f"mean_{metric}_ms"])
        for p in PERCENTILES:
            row(f"P{p} {metric.upper()} (ms):", s[f"p{p}_{metric}_ms"])
    if s.get("phases"):
        lines.append(f"{'-' * 14} Where the time went (server timeline) {'-' * 14}")
        lines.append(f"{'phase (* = part of TTFT)':<28}{'mean ms':>10}" + "".join(f"{f'p{p} ms':>10}"
                                                                            for p in PERCENTILES))
        for name, row in s["phases"].items():
            label = f"{'*' if row['ttft'] else ' '} {name}"
            lines.append(f"{label:<28}{row['mean_ms']:>10.2f}" + "".join(f"{row[f'p{p}_ms']:>10.2f}"
                                                                     for p in PERCENTILES))
    lines.append("=" * 56)
    return "\n".join(lines)
