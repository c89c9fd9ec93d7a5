"""scripts/gpu_decode_pod_itl.py on CPU, tiny: monolithic, prefill and decode processes on the bundled model, with
asynchronous scheduling forced; the decode pod computes none of the prompts and makes the monolithic tokens."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_decode_pod_itl.py"


@pytest.mark.timeout(600)
def test_cpu_dry_run_prints_both_itls_and_their_ratio(tmp_path):
    argv = [sys.executable, "-P", str(SCRIPT), "--model", "smollm2-135m-instruct", "--device", "cpu", "--batch", "2",
            "--context", "8", "--steps", "1", "--max-num-batched-tokens", "16", "--async-scheduling",
            "--tolerance", "1000", "--kv-path", str(tmp_path / "kv")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    mono = float(re.search(r"monolithic\s+ITL\s+([\d.]+) ms", out).group(1))
    dec = float(re.search(r"decode pod\s+ITL\s+([\d.]+) ms", out).group(1))
    ratio = float(re.search(r"ratio decode/monolithic ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(dec / mono, rel=1e-2)
    assert "async scheduling on" in out and "async scheduling off" not in out
    assert "prompt tokens computed: 0; load failures: none" in out
    assert "same tokens in 2/2 requests" in out
    assert list((tmp_path / "kv").rglob("*.kv"))  # the KV went through the store
