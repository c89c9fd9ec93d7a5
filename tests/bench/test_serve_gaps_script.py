"""scripts/serve_gaps.py on a hand-written `bench serve --save-detailed` result: counts and gap times exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "serve_gaps.py"


def _request(start, ttft, itl, success=True):
    return {"success": success, "start": start, "ttft": ttft, "itl": itl}


def test_counts_misses_and_places_each_gap(tmp_path):
    run = {"request_rate": 60.0, "summary": {}, "requests": [
        _request(0.0, 0.1, [0.01, 0.08, 0.01]),  # a gap of 80 ms starting at 0.11 s
        _request(0.5, 0.7, [0.01]),  # over the TTFT bound
        _request(1.0, 0.2, [0.06]),  # a gap of 60 ms starting at 1.2 s
        _request(1.5, 9.0, [0.5], success=False),  # failed: not counted
    ]}
    (tmp_path / "pdserve").mkdir()
    (tmp_path / "pdserve" / "serve.json").write_text(json.dumps({"runs": [run]}))
    out = subprocess.run([sys.executable, "-P", str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert "rate 60.0: 3 requests, 1 over the TTFT bound, 2 with a gap over 50 ms" in out
    assert "gaps (start s, ms): [(0.11, 80.0), (1.2, 60.0)]" in out


def test_says_when_the_run_kept_no_requests(tmp_path):
    (tmp_path / "serve.json").write_text(json.dumps({"runs": [{"request_rate": 15.0, "summary": {}}]}))
    out = subprocess.run([sys.executable, "-P", str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert "no per-request data (run with --save-detailed)" in out


def test_matches_each_stall_against_the_engine_steps(tmp_path):
    """Wall-clock stalls against a step trace: a 90 ms gap two requests share while an 85 ms step ran is the
    engine's; a 100 ms gap no step overlapped is outside it; a 70 ms gap over 5 ms steps is not explained."""
    t0 = 1000.0
    run = {"request_rate": 60.0, "summary": {}, "requests": [
        {"success": True, "start": 0.0, "sent_at": t0, "ttft": 0.1, "latency": 0.5,
         "itl": [0.1, 0.09, 0.01, 0.07]},  # gaps over 50 ms: 0.1-0.2, 0.2-0.29, 0.3-0.37
        {"success": True, "start": 0.15, "sent_at": t0 + 0.15, "ttft": 0.05, "latency": 0.3, "itl": [0.09]},
    ]}
    (tmp_path / "serve.json").write_text(json.dumps({"runs": [run]}))
    steps = [{"pid": 1, "role": "both", "end": t0 + 0.29, "ms": 85.0, "tokens": 4096, "seqs": 3, "decodes": 2,
              "context": 0}]
    steps += [{"pid": 1, "role": "both", "end": t0 + 0.3 + 0.005 * i, "ms": 5.0, "tokens": 2, "seqs": 2,
               "decodes": 2, "context": 10} for i in range(1, 15)]
    trace = tmp_path / "steps.jsonl"
    trace.write_text("".join(json.dumps(s) + "\n" for s in steps) + '{"torn')
    out = subprocess.run([sys.executable, "-P", str(SCRIPT), str(tmp_path), "--steps", str(trace)],
                         capture_output=True, text=True, check=True).stdout
    assert "engine steps (both): 15, p50 5.0 ms, p99 85.0 ms, max 85.0 ms, 1 over 50 ms" in out
    assert "at    0.100 s:  100.0 ms, 1 request(s); no engine step overlapped: outside the engine" in out
    assert ("at    0.200 s:   90.0 ms, 2 request(s); longest step 85.0 ms (both, 4096 tokens, 3 seqs, "
            "2 decodes)\n") in out
    assert "at    0.300 s:   70.0 ms, 1 request(s); longest step 5.0 ms (both, 2 tokens, 2 seqs, 2 decodes): " \
           "the steps do not explain it" in out
    # A run the trace does not cover (the peer's) gets no step matching at all.
    trace.write_text(json.dumps(dict(steps[0], end=t0 + 100)) + "\n")
    out = subprocess.run([sys.executable, "-P", str(SCRIPT), str(tmp_path), "--steps", str(trace)],
                         capture_output=True, text=True, check=True).stdout
    assert "2 with a gap over 50 ms" in out and "engine steps" not in out and " at " not in out


def test_a_stall_over_a_chain_of_long_steps_is_the_engines(tmp_path):
    """A slow engine (say on a CPU): gaps of 60 ms back to back for 0.6 s merge into one stall that no single
    80 ms step spans, but steps over the bound ran for all of it."""
    t0 = 2000.0
    run = {"request_rate": 8.0, "summary": {}, "requests": [
        {"success": True, "start": 0.0, "sent_at": t0, "ttft": 0.1, "latency": 0.7, "itl": [0.06] * 10},
        {"success": True, "start": 0.0, "sent_at": t0, "ttft": 0.13, "latency": 0.7, "itl": [0.06] * 9},
    ]}
    (tmp_path / "serve.json").write_text(json.dumps({"runs": [run]}))
    steps = [{"pid": 1, "role": "both", "end": t0 + 0.1 + 0.08 * i, "ms": 80.0, "tokens": 2, "seqs": 2,
              "decodes": 2, "context": 10} for i in range(10)]
    trace = tmp_path / "steps.jsonl"
    trace.write_text("".join(json.dumps(s) + "\n" for s in steps))
    out = subprocess.run([sys.executable, "-P", str(SCRIPT), str(tmp_path), "--steps", str(trace)],
                         capture_output=True, text=True, check=True).stdout
    assert "at    0.100 s:  600.0 ms, 19 request(s); longest step 80.0 ms (both, 2 tokens, 2 seqs, 2 decodes); " \
           "steps over 50 ms ran for 100% of it" in out
    assert "do not explain" not in out
