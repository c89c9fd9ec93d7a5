"""Why requests missed the SLOs in a `pdserve bench serve --save-detailed` run: per server and rate, how many
missed the TTFT bound, how many had an inter-token gap over the ITL bound, and when those gaps happened (seconds
from the trial's start). Gaps of many requests at one moment point to a server-wide stall (a collector pause, a
compile, a graph build); scattered gaps to long steps.

With ``--steps FILE`` (the engine's ``PDSERVE_STEP_TRACE`` file from the same run) each stall is matched against
the engine steps that overlapped it: a stall as long as a step that was running is the engine's; a stall no step
explains happened between the engine and the client (the API server, the router, the network).

Usage: python3 scripts/serve_gaps.py RESULT_DIR [--ttft 0.5] [--itl 0.05] [--steps FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def stalls(request: dict, bound_s: float) -> list[tuple[float, float]]:
    """(start s, length ms) of each inter-token gap of ``request`` over ``bound_s``."""
    t = request["start"] + request["ttft"]
    out = []
    for gap in request["itl"]:
        if gap > bound_s:
            out.append((round(t, 3), round(gap * 1e3, 1)))
        t += gap
    return out


def wall_stalls(requests: list[dict], bound_s: float) -> list[tuple[float, float, int]]:
    """Gaps over ``bound_s`` on the wall clock, merged where they overlap: (start, end, requests affected)."""
    spans = []
    for r in requests:
        t = r.get("sent_at", 0.0) + r["ttft"]
        for gap in r["itl"]:
            if gap > bound_s:
                spans.append((t, t + gap))
            t += gap
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a < merged[-1][1] - 1e-6:  # overlapping, not merely back to back (one request's next gap)
            merged[-1][1] = max(merged[-1][1], b)
            merged[-1][2] += 1
        else:
            merged.append([a, b, 1])
    return [(a, b, int(n)) for a, b, n in merged]


def longest_step(steps: list[dict], start: float, end: float) -> dict | None:
    """The longest engine step whose run overlapped ``[start, end]`` (wall clock)."""
    inside = [s for s in steps if s["end"] >= start and s["end"] - s["ms"] / 1e3 <= end]
    return max(inside, key=lambda s: s["ms"], default=None)


def slow_cover(steps: list[dict], start: float, end: float, bound_ms: float) -> float:
    """The share of ``[start, end]`` during which some engine step over ``bound_ms`` was running (steps of one
    engine do not overlap; a stall may span a chain of long steps, none as long as the stall)."""
    covered = sum(max(0.0, min(end, s["end"]) - max(start, s["end"] - s["ms"] / 1e3))
                  for s in steps if s["ms"] > bound_ms)
    return min(1.0, covered / (end - start)) if end > start else 0.0


def explain(stall: tuple[float, float, int], steps: list[dict], t0: float, bound_ms: float) -> str:
    """One line: when, how long, how many requests, and the engine step behind it (if any). A stall is the
    engine's when one step ran for at least half of it or long steps cover at least half of it."""
    start, end, count = stall
    gap_ms = (end - start) * 1e3
    step = longest_step(steps, start, end)
    head = f"    at {start - t0:8.3f} s: {gap_ms:6.1f} ms, {count} request(s); "
    if step is None:
        return head + "no engine step overlapped: outside the engine"
    what = (f"longest step {step['ms']:.1f} ms ({step['role']}, {step['tokens']} tokens, {step['seqs']} seqs, "
            f"{step['decodes']} decodes)")
    if step["ms"] >= gap_ms / 2:
        return head + what
    cover = slow_cover(steps, start, end, bound_ms)
    if cover >= 0.5:
        return head + what + f"; steps over {bound_ms:g} ms ran for {cover:.0%} of it"
    return head + what + ": the steps do not explain it"


def step_summary(steps: list[dict], bound_ms: float) -> str:
    """Step count, p50/p99/max step time and how many steps ran over the bound, per role."""
    lines = []
    for role in sorted({s["role"] for s in steps}):
        ms = sorted(s["ms"] for s in steps if s["role"] == role)
        p50, p99 = (ms[min(len(ms) - 1, int(q * len(ms)))] for q in (0.5, 0.99))
        over = sum(m > bound_ms for m in ms)
        lines.append(f"  engine steps ({role}): {len(ms)}, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
                     f"max {ms[-1]:.1f} ms, {over} over {bound_ms:g} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result_dir")
    parser.add_argument("--ttft", type=float, default=0.5, help="TTFT bound, seconds")
    parser.add_argument("--itl", type=float, default=0.05, help="inter-token gap bound, seconds")
    parser.add_argument("--steps", help="the engine's PDSERVE_STEP_TRACE file from the same run")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.result_dir, "**", "serve.json"), recursive=True))
    if not paths:
        raise SystemExit(f"no serve.json under {args.result_dir}")
    steps = _read_steps(args.steps) if args.steps else []
    for path in paths:
        for run in json.load(open(path))["runs"]:
            requests = [r for r in run.get("requests") or [] if r["success"]]
            if not requests:
                print(f"{path}: rate {run['request_rate']}: no per-request data (run with --save-detailed)")
                continue
            slow_first = sum(r["ttft"] > args.ttft for r in requests)
            gaps = sorted(g for r in requests for g in stalls(r, args.itl))
            with_gap = sum(bool(stalls(r, args.itl)) for r in requests)
            print(f"{path}: rate {run['request_rate']}: {len(requests)} requests, {slow_first} over the TTFT "
                  f"bound, {with_gap} with a gap over {args.itl * 1e3:g} ms")
            if gaps:
                print("  gaps (start s, ms):", gaps[:60])
            if steps and all(r.get("sent_at") for r in requests):
                t0 = min(r["sent_at"] - r["start"] for r in requests)
                end = max(r["sent_at"] + r["latency"] for r in requests)
                window = [s for s in steps if s["end"] >= t0 and s["end"] - s["ms"] / 1e3 <= end]  # overlapping
                if not window:  # another engine's run (the peer writes no trace): nothing to match against
                    continue
                print(step_summary(window, args.itl * 1e3))
                for stall in wall_stalls(requests, args.itl):
                    print(explain(stall, window, t0, args.itl * 1e3))


def _read_steps(path: str) -> list[dict]:
    steps = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                steps.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed server
                continue
    return steps


if __name__ == "__main__":
    main()
