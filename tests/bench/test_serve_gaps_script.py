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
