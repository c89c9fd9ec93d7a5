"""Why requests missed the SLOs in a `pdserve bench serve --save-detailed` run: per server and rate, how many
missed the TTFT bound, how many had an inter-token gap over the ITL bound, and when those gaps happened (seconds
from the trial's start). Gaps of many requests at one moment point to a server-wide stall (a collector pause, a
compile, a graph build); scattered gaps to long steps.

Usage: python3 scripts/serve_gaps.py RESULT_DIR [--ttft 0.5] [--itl 0.05]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result_dir")
    parser.add_argument("--ttft", type=float, default=0.5, help="TTFT bound, seconds")
    parser.add_argument("--itl", type=float, default=0.05, help="inter-token gap bound, seconds")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.result_dir, "**", "serve.json"), recursive=True))
    if not paths:
        raise SystemExit(f"no serve.json under {args.result_dir}")
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


if __name__ == "__main__":
    main()
