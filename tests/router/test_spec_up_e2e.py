"""Acceptance: through ``pdserve up`` with the decode pod speculating (n-gram prompt lookup) after a KV handover
from the prefill pod, the official ``openai`` client gets the greedy answer of a monolithic engine that does not
speculate, on a copy-heavy prompt; the decode pod's /metrics count accepted drafts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.router.test_up_e2e import ENGINE_FLAGS, LAUNCH, MODEL, free_port, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
openai = pytest.importorskip("openai")

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
# Long enough for the router to prefill it remotely; its continuation repeats the pattern.
PROMPT = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60))


def test_decode_pod_speculates_after_a_kv_handover(tmp_path):
    up_port, mono_port, metrics_port = free_port(), free_port(), free_port()
    decode_args = f"--speculative-config '{json.dumps(SPEC)}' --metrics-port {metrics_port}"
    logs = [open(tmp_path / "up.log", "wb"), open(tmp_path / "serve.log", "wb")]
    up = subprocess.Popen([sys.executable, "-c", LAUNCH, "up", "--port", str(up_port), "--engine-args", ENGINE_FLAGS,
                           "--decode-args", decode_args], cwd=tmp_path, stdout=logs[0], stderr=subprocess.STDOUT)
    mono = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", "--model", MODEL, "--port", str(mono_port),
                             *ENGINE_FLAGS.split()], cwd=tmp_path, stdout=logs[1], stderr=subprocess.STDOUT,
                            env={**os.environ, "PDSERVE_API_KEY": "unused"})
    try:
        wait_http(f"http://127.0.0.1:{mono_port}/health", mono)
        wait_http(f"http://127.0.0.1:{up_port}/health", up)
        texts = []
        for port in (up_port, mono_port):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=300)
            texts.append(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                                   temperature=0).choices[0].text)
        assert texts[0] == texts[1]
        assert "Fact 60" in texts[0]  # the copy-heavy continuation the drafts are meant for
        with urllib.request.urlopen(f"http://127.0.0.1:{up_port}/metrics", timeout=10) as resp:
            assert 'decision="remote-prefill"' in resp.read().decode()  # the KV came from the prefill pod
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("pdserve:spec_decode_num_")}
        assert values["pdserve:spec_decode_num_accepted_tokens_total"] > 10
        assert values["pdserve:spec_decode_num_draft_tokens_total"] >= values[
            "pdserve:spec_decode_num_accepted_tokens_total"]
    finally:
        for proc in (up, mono):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (up, mono):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
